"""``patchcore sign``: sign a verified model file with the key in PATCHCORE_MODEL_KEY (HMAC-SHA256)."""

from __future__ import annotations

import argparse
import hmac
import logging

from ...errors import PatchCoreError
from ...persistence import read_header, read_state, write_state
from ...persistence.model_file import KEY_VARIABLE, signature, signing_key

NAME = "sign"
HELP = f"sign a model file with the key in {KEY_VARIABLE}, so that loading it there can refuse forgeries"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the model to sign (its checksum is verified first)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT_MODEL", help="signed model to write (may equal MODEL)"
    )


def run(args: argparse.Namespace) -> int:
    key = signing_key()
    if key is None:
        raise PatchCoreError(f"set {KEY_VARIABLE} to the site's signing key first")
    header = read_header(args.model)
    if "signature" in header and not hmac.compare_digest(str(header["signature"]), signature(key, header["checksum"])):
        raise PatchCoreError(f"{args.model}: signed with another key: it is not signed again")
    write_state(args.output, read_state(args.model, verify_signature=False))
    logger.info("signed %s; wrote %s", args.model, args.output)
    return 0
