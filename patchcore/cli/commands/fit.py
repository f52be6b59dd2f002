"""``patchcore fit``: fit a detector on good images, or add images to a fitted one (``--add``)."""

from __future__ import annotations

import argparse
import logging

from ...errors import PatchCoreError
from ...persistence import check_model_target
from ..engine import add_engine_flags, check_engine_flags, fit_on_ray
from ..options import (
    add_config_flags,
    add_folder_flags,
    add_runtime_flags,
    dataset_from_args,
    load_detector,
    make_detector,
    refuse_model_settings,
)

NAME = "fit"
HELP = "fit a model on good images"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        help="MVTec/MPDD/BTAD or VisA category (its training images), a folder of good images, or 'textile'",
    )
    add_folder_flags(parser)
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    parser.add_argument(
        "--add",
        metavar="MODEL",
        help="add DATA's good images to this fitted model or ensemble (incremental; may equal -o)",
    )
    add_config_flags(parser)
    add_runtime_flags(parser)
    add_engine_flags(parser, shards=True)


def data_folder(args: argparse.Namespace) -> str | None:
    """The folder the model records its training images' paths relative to (for explanations)."""
    folder = args.good or args.data
    return None if folder in (None, "textile") else folder


def run(args: argparse.Namespace) -> int:
    check_model_target(args.output)
    check_engine_flags(args)
    if args.add:  # settings and model first: a bad one is refused before any image is read
        refuse_model_settings(args, "--add keeps the model's settings")
        if args.engine != "local":
            raise PatchCoreError("--add runs on this machine (it reads only the new images): drop --engine ray")
        detector = load_detector(args.add, args)
        detector.partial_fit(dataset_from_args(args).train, root=data_folder(args))
    else:
        make_detector(args)  # the settings are checked before any image is opened
        train = dataset_from_args(args).train
        detector = make_detector(args, train)  # with the geometry chosen from the images unless fixed
        if args.engine == "ray":
            fit_on_ray(args, detector, list(train))
        else:
            detector.fit(train, root=data_folder(args))
    detector.save(args.output)
    stats = detector.fit_stats_
    logger.info(
        "fitted on %d images in %.1f s: memory bank %d of %d patches; wrote %s",
        detector.n_train_,
        stats["fit_seconds"],
        detector.memory_bank_size,
        stats["full_bank_size"],
        args.output,
    )
    return 0
