"""``patchcore serve``: the inspection service (HTTP API, web page, feedback, metrics) over one model file."""

from __future__ import annotations

import argparse
import os

from ...errors import PatchCoreError
from ..options import add_runtime_flags, runtime_from_args

NAME = "serve"
HELP = "serve a model over HTTP: JSON API, web page, operator feedback, metrics (needs patchcore[serve])"
TOKEN_VARIABLE = "PATCHCORE_TOKEN"


def positive_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of megabytes") from None
    if not 0 < value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of megabytes")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"feedback and reload need 'Authorization: Bearer TOKEN' (default: ${TOKEN_VARIABLE}, else none)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=positive_mb,
        default=20.0,
        metavar="MB",
        help="largest image file accepted (default: 20)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DIR",
        help="the data folder the model was fitted from: explanations crop the nearest normal patch from its "
        "training images (repeatable; the model's own folder, with the feedback images, is always searched)",
    )
    add_runtime_flags(parser)


def run(args: argparse.Namespace) -> int:
    from ...serve import require_extra, serve

    if not 0 < args.port < 65536:
        raise PatchCoreError(f"--port {args.port} must lie between 1 and 65535")
    require_extra()
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        token=token,
        max_upload_mb=args.max_upload_mb,
        data_roots=args.data,
        runtime={**runtime_from_args(args), "progress": False},
    )
