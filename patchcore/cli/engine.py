"""``--engine``: where ``predict`` and ``fit`` run (this process, or Ray), and the glue to the Ray engine.

The engine module (and Ray) is imported only when ``--engine ray`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..detectors import Detector
from ..errors import PatchCoreError
from .options import RESULT_KEYS, positive_int, runtime_from_args

ENGINES = ("local", "ray")


def add_engine_flags(parser: argparse.ArgumentParser, shards: bool = False) -> None:
    group = parser.add_argument_group("engine (never changes results, except fit's --shards)")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); ray: a Ray cluster or Ray local (pip install 'patchcore[ray]')",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this Ray cluster: auto (the one 'ray start' runs here) or ray://HOST:10001 "
        "(default: start Ray locally on this machine's CPUs)",
    )
    group.add_argument(
        "--num-workers",
        type=positive_int,
        metavar="N",
        help="Ray workers (actors, or shard tasks at a time), one CPU each (default: the cluster's CPUs)",
    )
    if shards:
        group.add_argument(
            "--shards",
            type=positive_int,
            metavar="N",
            help="fit on Ray: split the training images into N shards, one coreset each, then one over their union "
            "(default: --num-workers; the model depends on the seed and N only)",
        )


def check_engine_flags(args: argparse.Namespace) -> None:
    """Ray flags need ``--engine ray`` (refused before any work)."""
    if args.engine != "ray":
        given = [
            flag
            for flag, name in (
                ("--ray-address", "ray_address"),
                ("--num-workers", "num_workers"),
                ("--shards", "shards"),
            )
            if getattr(args, name, None) is not None
        ]
        if given:
            raise PatchCoreError(f"{', '.join(given)} need --engine ray")


def worker_runtime(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime settings of the detector on a worker (no progress bars there)."""
    return {**runtime_from_args(args), "progress": False}


def predict_on_ray(
    args: argparse.Namespace, detector: Detector, inputs: list[Path], names: list[Path], out: Path
) -> tuple[int, int]:
    """``predict --engine ray``: (rows written, unreadable images)."""
    from ..engines import ray_engine

    return ray_engine.predict(
        detector,
        Path(args.model).read_bytes(),
        inputs,
        names,
        out,
        RESULT_KEYS,
        runtime=worker_runtime(args),
        maps=args.maps,
        overlays=args.overlays,
        address=args.ray_address,
        num_workers=args.num_workers,
        on_error=lambda message: print(f"patchcore: error: {message}", file=sys.stderr),
    )


def fit_on_ray(args: argparse.Namespace, detector: Detector, images: list[Any]) -> Detector:
    """``fit --engine ray``: the detector fitted in shards on Ray."""
    from ..engines import ray_engine

    return ray_engine.fit(detector, images, shards=args.shards, address=args.ray_address, num_workers=args.num_workers)
