"""``patchcore info``: print a verified model file's header (settings, provenance, training facts, thresholds),
with the settings as this version reads them."""

from __future__ import annotations

import argparse
import json

from ...persistence import read_document

NAME = "info"
HELP = "print a model file's settings and provenance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(read_document(args.model), indent=2, sort_keys=True))
    return 0
