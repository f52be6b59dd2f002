"""``patchcore calibrate``: set a fitted detector's thresholds from images it was not fitted on, or by hand."""

from __future__ import annotations

import argparse
import logging

from ...datasets import image_folder
from ...errors import PatchCoreError
from ...persistence import check_model_target
from ..options import add_runtime_flags, load_detector

NAME = "calibrate"
HELP = "set a fitted model's thresholds from images it was not fitted on, or by hand"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT_MODEL", help="model file to write (may equal MODEL)"
    )
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--fpr", type=float, metavar="RATE", help="flag this share of the --good images (and of their pixels)"
    )
    how.add_argument("--f1", action="store_true", help="F1-optimal image threshold on --good and --defective images")
    how.add_argument("--threshold", type=float, metavar="VALUE", help="image threshold by hand")
    parser.add_argument(
        "--pixel-threshold", type=float, metavar="VALUE", help="pixel threshold by hand (with --threshold)"
    )
    parser.add_argument("--good", metavar="DIR", help="good images not used in fit")
    parser.add_argument("--defective", metavar="DIR", help="defective images (for --f1)")
    add_runtime_flags(parser)


def run(args: argparse.Namespace) -> int:
    check_model_target(args.output)
    if args.pixel_threshold is not None and args.threshold is None:
        raise PatchCoreError(
            "--pixel-threshold goes with --threshold (both by hand); --fpr sets both from --good images"
        )
    detector = load_detector(args.model, args)
    if args.threshold is not None:
        detector.set_threshold(args.threshold, args.pixel_threshold)
    elif not args.good:
        raise PatchCoreError("--fpr and --f1 need --good DIR (good images the model was not fitted on)")
    elif args.f1:
        if not args.defective:
            raise PatchCoreError("--f1 needs --defective DIR as well")
        detector.calibrate_f1(image_folder(args.good).train, image_folder(args.defective).train)
    else:
        detector.calibrate(image_folder(args.good).train, args.fpr)
    detector.save(args.output)
    logger.info("thresholds: %s; wrote %s", detector.thresholds_, args.output)
    return 0
