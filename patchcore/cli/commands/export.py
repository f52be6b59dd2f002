"""``patchcore export``: a fitted model as ONNX (or OpenVINO IR) for the torch-free runtime."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ...errors import PatchCoreError
from ...persistence import check_model_target
from ...runtime import EXPORT_FORMAT, read_export

NAME = "export"
HELP = "export a fitted model to ONNX or OpenVINO (scores and maps in one graph)"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a fitted model file (.safetensors)")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="the export, e.g. model.onnx (openvino: model.xml and model.bin; -o model.onnx names those too)",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx (default; runs on ONNX Runtime, see `patchcore predict FILE.onnx`) or openvino (FILE's .xml "
        "and .bin beside each other, f32; needs pip install openvino)",
    )


def recognise_export(path: Path) -> None:
    """An earlier export may be replaced: an .onnx with patchcore metadata, or an OpenVINO .xml holding it."""
    if path.suffix.lower() == ".onnx":
        read_export(path, verify=False)
    elif EXPORT_FORMAT.encode() not in path.read_bytes()[-(1 << 20) :]:
        raise PatchCoreError(f"{path}: not a patchcore export")


def run(args: argparse.Namespace) -> int:
    from ...detectors import load
    from ...export import export

    model, out = Path(args.model), Path(args.output)
    if args.format == "openvino" and out.suffix.lower() == ".onnx":
        out = out.with_suffix(".xml")  # `-o model.onnx --format openvino`: the IR model.xml + model.bin beside it
    suffix = ".onnx" if args.format == "onnx" else ".xml"
    if out.suffix.lower() != suffix:
        raise PatchCoreError(f"{out}: name the {args.format} export FILE{suffix}, e.g. -o model{suffix}")
    if out.exists() and out.resolve() == model.resolve():
        raise PatchCoreError(f"{out}: is the model itself: choose another output file")
    check_model_target(out, recognise_export)
    # the files written beside it: replaced only as part of an earlier export, which `out` then is
    sibling = out.with_suffix(".bin") if args.format == "openvino" else out.with_name(out.name + ".data")
    if sibling.exists() and not out.exists():
        raise PatchCoreError(
            f"{sibling}: exists and the export would replace it, but it is no part of an export named {out.name}: "
            "remove it or choose another name"
        )
    detector = load(model)
    written = export(detector, out, args.format)
    logger.info("wrote %s", ", ".join(str(path) for path in written))
    return 0
