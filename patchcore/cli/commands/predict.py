"""``patchcore predict``: score image files and folders with a fitted detector; CSV, JSONL, maps, overlays."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ...detectors.base import Detector
from ...errors import PatchCoreError
from ...imaging import list_images, load_image
from ...reporting.files import output_names, with_extension, write_npy
from ...reporting.overlays import OverlayWriter
from ...reporting.results import error_row, map_path, original_map, scored_row, write_results
from ..engine import add_engine_flags, check_engine_flags, predict_on_ray
from ..options import (
    OVERLAY_HELP,
    RESULT_KEYS,
    add_runtime_flags,
    check_output_folder,
    check_planned_outputs,
    load_scorer,
)

NAME = "predict"
HELP = "score images with a fitted model"
EXIT_PARTIAL = 3  # results were written, but some inputs could not be read
PIXEL_BUDGET = 3 * 64_000_000  # decoded values held at once (768 MB of float32): huge images go in small batches
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model file, or an .onnx export (runs without torch)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--maps", action="store_true", help="write OUT/maps/<relative path>.npy anomaly maps")
    parser.add_argument(
        "--overlays", action="store_true", help=f"write OUT/overlays/<relative path>.png: {OVERLAY_HELP}"
    )
    add_runtime_flags(parser)
    add_engine_flags(parser)


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image path, path relative to its INPUT) for every image named or found under a folder."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise PatchCoreError(f"{path}: no images in this folder")
            found += [(p, p.relative_to(path)) for p in images]
        elif path.exists():
            found.append((path, Path(path.name)))
        else:
            raise PatchCoreError(f"{path}: no such file or folder")
    return found


def run(args: argparse.Namespace) -> int:
    check_engine_flags(args)
    out = Path(args.output)
    inputs = collect_inputs(args.inputs)
    check_output_folder(out, [Path(args.model), *(Path(item) for item in args.inputs)])
    names = output_names([relative for _, relative in inputs])
    planned = [out / "scores.csv", out / "results.jsonl"]
    planned += [out / folder / with_extension(name, ".png") for name in names for folder in ("overlays", "masks")]
    planned += [out / "maps" / with_extension(name, ".npy") for name in names]
    check_planned_outputs(planned, [Path(args.model), *(path for path, _ in inputs)])
    detector = load_scorer(args.model, args)
    if args.engine == "ray":
        if not isinstance(detector, Detector):
            raise PatchCoreError("--engine ray ships a model file to its workers: pass the .safetensors, not an export")
        return finish(out, *predict_on_ray(args, detector, [path for path, _ in inputs], names, out))
    rows: list[dict | None] = [None] * len(inputs)
    failed = 0
    batch: list[tuple[int, np.ndarray]] = []
    overlays = OverlayWriter(out, detector.thresholds_, detector.score_scale) if args.overlays else None
    with_maps = args.maps or overlays is not None

    def flush() -> None:
        results = detector.infer([image for _, image in batch], maps=with_maps)
        for (i, image), result in zip(batch, results):
            path, name = inputs[i][0], names[i]
            if args.maps:
                write_npy(map_path(out, name), original_map(result.map(), result.geometry))
            if overlays is not None:
                overlays.add(image, name, result.map(), result.geometry, path=path)
            rows[i] = scored_row(path, result.score, detector)
        batch.clear()

    for i, (path, _) in enumerate(inputs):
        try:
            batch.append((i, load_image(path, args.max_pixels)))
        except PatchCoreError as exc:
            failed += 1
            print(f"patchcore: error: {exc}", file=sys.stderr)
            rows[i] = error_row(path, str(exc))
        if len(batch) >= detector.resolved_batch_size() or sum(a.size for _, a in batch) >= PIXEL_BUDGET:
            flush()
    if batch:
        flush()
    if overlays is not None:
        overlays.finish()
    return finish(out, write_results(out, RESULT_KEYS, [row for row in rows if row is not None]), failed)


def finish(out: Path, written: int, failed: int) -> int:
    """The run's summary and exit code, once its files are written."""
    logger.info("scored %d of %d images; wrote %s", written - failed, written, out / "scores.csv")
    if failed:
        where = out / "scores.csv"
        print(
            f"patchcore: error: {failed} of {written} images could not be read (see the error column of {where})",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return 0
