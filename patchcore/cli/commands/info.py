"""``patchcore info``: print a model file's header (settings, provenance, training facts, thresholds), after
verifying it as a load does (checksum, signature, every header field, the backbone weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...persistence import read_document

NAME = "info"
HELP = "print a model file's settings and provenance (verified like a load)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model file, or an .onnx export (its metadata)")


def run(args: argparse.Namespace) -> int:
    if Path(args.model).suffix.lower() == ".onnx":
        from ...runtime import OnnxDetector

        document = OnnxDetector.load(args.model).metadata_  # checks the bank's hash, as a load does
    else:
        from ...detectors import load

        load(args.model)  # refuses what a load refuses, in one line
        document = read_document(args.model)
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0
