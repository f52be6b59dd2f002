"""Command line: ``patchcore fit | predict | evaluate | calibrate | info`` (one module each in ``commands``).

Model flags map one to one onto :class:`~patchcore.config.PatchCoreConfig` fields (``--coreset-ratio`` ->
``coreset_ratio``). Problems the user can fix end in one ``patchcore: error: ...`` line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import NoReturn

from .._version import __version__
from ..errors import PatchCoreError
from .commands import COMMANDS, EXIT_ERROR


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the options are listed, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"patchcore: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="patchcore", description="PatchCore anomaly detection (Roth et al., 2022).")
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if args.command != "info":  # the long-running commands say what they did
        logging.getLogger("patchcore").setLevel(logging.INFO)
    run = {command.NAME: command.run for command in COMMANDS}[args.command]
    try:
        return run(args)
    except PatchCoreError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print("patchcore: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except MemoryError:
        return fail("out of memory: lower --batch-size, or set --max-bank-memory for fit")
    except OSError as exc:  # disk full, permissions, a vanished file: the system's own words say it best
        return fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
    except Exception as exc:  # a bug: one line, and the traceback with -v
        if args.verbose:
            traceback.print_exc()
        return fail(f"unexpected {type(exc).__name__}: {exc} (please report it; -v shows the traceback)")


def fail(message: str) -> int:
    """Print ``patchcore: error: MESSAGE`` on one line and return the error exit code."""
    print("patchcore: error: " + " ".join(message.split()), file=sys.stderr)
    return EXIT_ERROR
