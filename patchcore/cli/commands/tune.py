"""``patchcore tune``: choose settings without defect samples and fit the pick.

Seeded synthetic defects on held-out good images score every candidate of a small grid
(:data:`patchcore.tune.GRID`); the best (the cheapest within 0.005 of the best synthetic AUROC) is fitted on
every good image and written to MODEL, and the table of every candidate's synthetic AUROC and cost to CSV.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ...errors import PatchCoreError
from ...persistence import check_model_target
from ...reporting.files import write_csv
from ...tune.search import GRID
from ..options import (
    add_config_flags,
    add_folder_flags,
    add_runtime_flags,
    dataset_from_args,
    given_settings,
    make_detector,
    read_config_file,
    runtime_from_args,
)
from .fit import data_folder

NAME = "tune"
HELP = "choose settings on synthetic defects of held-out good images, then fit the pick"
logger = logging.getLogger("patchcore")
GRID_NAMES = tuple(GRID)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", nargs="?", help="a category or folder of good images, or 'textile'")
    add_folder_flags(parser)
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    parser.add_argument(
        "--table", metavar="CSV", help="the candidates' synthetic AUROC and cost (default: MODEL with .tune.csv)"
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        choices=GRID_NAMES,
        metavar="NAME",
        help=f"candidates to try (default: all of {GRID_NAMES})",
    )
    parser.add_argument(
        "--holdout-share",
        type=float,
        default=0.2,
        metavar="SHARE",
        help="good images held out for the synthetic defects (default 0.2, at most 40 images)",
    )
    add_config_flags(parser)
    add_runtime_flags(parser)


def run(args: argparse.Namespace) -> int:
    from ...tune import tune

    check_model_target(args.output)
    if not 0 < args.holdout_share < 1:
        raise PatchCoreError(f"--holdout-share {args.holdout_share} must lie in (0, 1), e.g. 0.2")
    if isinstance(getattr(args, "backbone", None), list) and len(args.backbone) > 1:
        raise PatchCoreError("tune chooses settings for one backbone: give one --backbone")
    table = Path(args.table) if args.table else Path(args.output).with_suffix(".tune.csv")
    make_detector(args)  # the settings are checked before any image is opened
    base = {**(read_config_file(args.config) if getattr(args, "config", None) else {}), **given_settings(args)}
    if isinstance(base.get("backbone"), list):
        base["backbone"] = base["backbone"][0]
    grid = {name: GRID[name] for name in args.grid or GRID_NAMES}
    train = dataset_from_args(args).train
    detector, candidates, chosen = tune(
        train,
        base,
        given=list(base),
        grid=grid,
        holdout_share=args.holdout_share,
        root=data_folder(args),
        **runtime_from_args(args),
    )
    rows = [{**c.row(), "chosen": c is chosen, "settings": json.dumps(c.settings)} for c in candidates]
    columns = list(rows[0])
    write_csv(table, columns, rows)
    detector.save(args.output)
    logger.info("tune: picked %s; wrote %s and %s", chosen.name, args.output, table)
    for row in rows:
        print(
            f"{row['name']:16s} synthetic AUROC {row['synthetic_auroc']:.3f}  fit {row['fit_seconds']:.1f} s  "
            f"predict {1000 * row['predict_seconds_per_image']:.1f} ms/img{'  <- chosen' if row['chosen'] else ''}"
        )
    return 0
