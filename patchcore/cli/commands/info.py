"""``patchcore info``: print a model file's header (settings, provenance, training facts, thresholds)."""

from __future__ import annotations

import argparse
import json

from ...persistence import read_header

NAME = "info"
HELP = "print a model file's settings and provenance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(read_header(args.model), indent=2, sort_keys=True))
    return 0
