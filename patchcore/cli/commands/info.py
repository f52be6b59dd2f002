"""``patchcore info``: print a model file's header (settings, provenance, training facts, thresholds), after
verifying it as a load does (checksum, signature, every header field, the backbone weights)."""

from __future__ import annotations

import argparse
import json

from ...detectors import load
from ...persistence import read_document

NAME = "info"
HELP = "print a model file's settings and provenance (verified like a load)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")


def run(args: argparse.Namespace) -> int:
    load(args.model)  # refuses what a load refuses, in one line
    print(json.dumps(read_document(args.model), indent=2, sort_keys=True))
    return 0
