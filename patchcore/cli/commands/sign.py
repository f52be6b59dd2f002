"""``patchcore sign``: sign a verified model file with the key in PATCHCORE_MODEL_KEY (HMAC-SHA256)."""

from __future__ import annotations

import argparse
import logging
import os

from ...errors import PatchCoreError
from ...persistence import read_state, write_state
from ...persistence.model_file import KEY_VARIABLE

NAME = "sign"
HELP = f"sign a model file with the key in {KEY_VARIABLE}, so that loading it there can refuse forgeries"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the model to sign (its checksum is verified first)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT_MODEL", help="signed model to write (may equal MODEL)"
    )


def run(args: argparse.Namespace) -> int:
    key = os.environ.get(KEY_VARIABLE, "")
    if not key:
        raise PatchCoreError(f"set {KEY_VARIABLE} to the site's signing key first")
    del os.environ[KEY_VARIABLE]  # the file is read as an unsigned one: it is being signed
    try:
        state = read_state(args.model)
    finally:
        os.environ[KEY_VARIABLE] = key
    write_state(args.output, state)
    logger.info("signed %s; wrote %s", args.model, args.output)
    return 0
