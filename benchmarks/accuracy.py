"""Accuracy of named settings on textile and on MVTec-layout folders: one table.

    python benchmarks/accuracy.py                                  # every named setting on textile
    python benchmarks/accuracy.py --data textile /data/mvtec/bottle --settings defaults peers multilevel
    python benchmarks/accuracy.py --setting 'mine={"resize": 256, "global_layers": ["blocks.2"]}' --out runs/acc

For every data set and setting: fit on the training split, then image AUROC (good vs all and per defect type;
textile's are "local" and "global"), pixel AUROC and PRO (when every defective image has a mask), fit
seconds and prediction seconds per image (decoding and maps included when masks exist). Settings are
``PatchCoreConfig`` fields (a multi-level model when they name level_sets, scales or global_layers); the
"peers" row is anomalib's PatchCore at its defaults with the same backbone (224 px crop of 256, blocks.2 +
blocks.4, 10% coreset, ImageNet mean/std, the paper's score). ``--out DIR`` writes DIR/accuracy.csv and
DIR/accuracy.json. Times are from whatever else the machine runs: compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from patchcore.config import PatchCoreConfig
from patchcore.datasets import open_dataset
from patchcore.detectors.base import Detector
from patchcore.evaluation.evaluate import evaluate
from patchcore.reporting.files import write_csv, write_json
from patchcore.tune.search import GRID, evaluate_grid

PEERS = {
    "resize": 256,
    "crop": 224,
    "layers": ["blocks.2", "blocks.4"],
    "coreset_ratio": 0.1,
    "normalization": "imagenet",
    "scoring": "paper",
    "global_branch": False,
    "coarse_branch": False,
}
# name -> PatchCoreConfig fields; "defaults" is whatever the package's defaults are when the script runs
# and every candidate of tune's grid under its name ("default" is "defaults")
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "peers": PEERS,
    # the defaults without their coarse bank, and with it at half the resolution: they differ in maps only
    "fine-only": {"coarse_branch": False},
    "coarse-half": {"coarse_pool": 2},
    **{name: settings for name, settings in GRID.items() if name != "default"},
}
COLUMNS = [
    "data",
    "setting",
    "image_auroc",
    "by_type",
    "pixel_auroc",
    "pro",
    "fit_seconds",
    "predict_seconds_per_image",
    "memory_bank_size",
    "settings",
]


def build(settings: dict[str, Any], train: list[Any], **runtime: Any) -> Detector:
    """The detector for ``settings`` (PatchCoreConfig fields) as ``patchcore fit`` builds it: the geometry
    chosen from the training images unless fixed, a multi-level model when the settings ask for one."""
    from patchcore.detectors import MultiLevelPatchCore, PatchCore
    from patchcore.imaging.auto_geometry import adapt_geometry

    config = adapt_geometry(PatchCoreConfig.from_dict(settings), train, given=settings)
    return MultiLevelPatchCore(config, **runtime) if config.multilevel else PatchCore(config, **runtime)


def run_one(data: str, name: str, settings: dict[str, Any], batch_size: int | None = None) -> dict[str, Any]:
    """Fit ``settings`` on ``data``'s training split and evaluate it on its test split: one table row."""
    dataset = open_dataset(data)
    detector = build(settings, dataset.train, batch_size=batch_size)
    started = time.perf_counter()
    detector.fit(dataset.train)
    fit_seconds = time.perf_counter() - started
    metrics, _ = evaluate(detector, dataset)
    return {
        "data": dataset.name,
        "setting": name,
        "image_auroc": metrics["image_auroc"],
        "by_type": metrics["image_auroc_by_type"],
        "pixel_auroc": metrics.get("pixel_auroc"),
        "pro": metrics.get("pro"),
        "fit_seconds": fit_seconds,
        "predict_seconds_per_image": metrics["predict_seconds_per_image"],
        "memory_bank_size": metrics["memory_bank_size"],
        "settings": settings,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (AUROCs to 3 decimals; '-' where a metric does not apply)."""

    def number(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| data | setting | image AUROC | by defect type | pixel AUROC | PRO | fit s | predict ms/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        by_type = " ".join(f"{k} {v:.3f}" for k, v in sorted(row["by_type"].items()))
        lines.append(
            f"| {row['data']} | {row['setting']} | {number(row['image_auroc'])} | {by_type} | "
            f"{number(row['pixel_auroc'])} | {number(row['pro'])} | {number(row['fit_seconds'], 1)} | "
            f"{number(1000 * row['predict_seconds_per_image'], 1)} |"
        )
    return "\n".join(lines)


def tune_check(real_rows: list[dict[str, Any]], seed: int = 0, batch_size: int | None = None) -> dict[str, Any]:
    """tune's synthetic AUROC of every grid candidate on textile's training images against the real AUROC
    (good vs all) of the same settings in ``real_rows`` (this script's textile rows): Spearman's rank
    correlation over the candidates found in both, and the real AUROC of tune's pick against the grid's best."""
    from scipy.stats import spearmanr

    from patchcore.tune.search import pick

    dataset = open_dataset("textile")
    real = {("default" if r["setting"] == "defaults" else r["setting"]): r["image_auroc"] for r in real_rows}
    grid = {name: settings for name, settings in GRID.items() if name in real}
    candidates = evaluate_grid(
        dataset.train, grid, lambda settings: build(settings, dataset.train, batch_size=batch_size), seed=seed
    )
    chosen = pick(candidates)
    synthetic = [c.synthetic_auroc for c in candidates]
    actual = [real[c.name] for c in candidates]
    rho = float(spearmanr(synthetic, actual).statistic)
    return {
        "candidates": [{**c.row(), "real_auroc": real[c.name]} for c in candidates],
        "spearman": rho,
        "pick": chosen.name,
        "pick_real_auroc": real[chosen.name],
        "best": max(candidates, key=lambda c: real[c.name]).name,
        "best_real_auroc": max(actual),
    }


def time_pair(
    names: list[str], settings: dict[str, dict[str, Any]], rounds: int, n_images: int
) -> dict[str, dict[str, float]]:
    """Fit and prediction cost of several settings on textile, interleaved (A, B, A, B, ...) so that whatever
    else the machine runs weighs on each alike: per setting the median over ``rounds`` of the process CPU
    seconds (one torch thread) of a fit on the first ``n_images`` training images, of scoring ``n_images``
    test images (per image) and of scoring them with their anomaly maps (``maps``, per image), and the same
    as wall seconds."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    dataset = open_dataset("textile")
    train, test = dataset.train[:n_images], [s.path for s in dataset.test[:: max(1, len(dataset.test) // n_images)]]
    test = test[:n_images]
    seen: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in ("fit_cpu", "fit_wall", "predict_cpu", "predict_wall", "maps_cpu", "maps_wall")}
        for n in names
    }
    for _ in range(rounds):
        for name in names:
            detector = build(settings[name], train)
            cpu, wall = time.process_time(), time.perf_counter()
            detector.fit(train)
            seen[name]["fit_cpu"].append(time.process_time() - cpu)
            seen[name]["fit_wall"].append(time.perf_counter() - wall)
            cpu, wall = time.process_time(), time.perf_counter()
            detector.score_samples(test)
            seen[name]["predict_cpu"].append((time.process_time() - cpu) / len(test))
            seen[name]["predict_wall"].append((time.perf_counter() - wall) / len(test))
            cpu, wall = time.process_time(), time.perf_counter()
            for result in detector.infer(test, maps=True):
                result.map()
            seen[name]["maps_cpu"].append((time.process_time() - cpu) / len(test))
            seen[name]["maps_wall"].append((time.perf_counter() - wall) / len(test))
    return {n: {k: float(np.median(v)) for k, v in d.items()} for n, d in seen.items()}


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """'name={json}' -> (name, fields)."""
    name, _, fields = text.partition("=")
    if not name or not fields:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME={{JSON of PatchCoreConfig fields}}")
    value = json.loads(fields)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the JSON must be an object of settings")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["textile"], help="'textile' and/or MVTec-layout category folders")
    parser.add_argument(
        "--settings",
        nargs="*",
        choices=sorted(SETTINGS),
        default=None,
        help="named settings to run (default: all of them, or none when --setting is given)",
    )
    parser.add_argument(
        "--setting", action="append", type=parse_setting, default=[], metavar="NAME=JSON", help="an extra setting"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--timing",
        type=int,
        nargs=2,
        metavar=("ROUNDS", "IMAGES"),
        help="instead: interleaved CPU and wall time of fit and prediction of the chosen settings on textile "
        "(ROUNDS rounds, IMAGES training and test images), ratios to the first setting",
    )
    parser.add_argument(
        "--tune-check",
        type=Path,
        metavar="ACCURACY_JSON",
        help="instead: tune's synthetic AUROC of the grid on textile against the real AUROCs in this file "
        "(an earlier --out's accuracy.json): Spearman and the pick against the best",
    )
    parser.add_argument("--out", type=Path, help="write OUT/accuracy.csv and OUT/accuracy.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.timing:
        named = args.settings or ["defaults"]
        every = {**SETTINGS, **dict(args.setting)}
        names = named + [name for name, _ in args.setting]
        times = time_pair(names, every, *args.timing)
        first = times[names[0]]
        for name in names:
            t = times[name]
            print(
                f"{name:16s} fit {t['fit_cpu']:.1f} CPU s ({t['fit_cpu'] / first['fit_cpu']:.2f}x), "
                f"predict {1000 * t['predict_cpu']:.1f} CPU ms/img ({t['predict_cpu'] / first['predict_cpu']:.2f}x), "
                f"with maps {1000 * t['maps_cpu']:.1f} ({t['maps_cpu'] / first['maps_cpu']:.2f}x); "
                f"wall {t['fit_wall']:.1f} s, {1000 * t['predict_wall']:.1f} / {1000 * t['maps_wall']:.1f} ms/img"
            )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "timing.json", times)
        return 0
    if args.tune_check:
        rows = [r for r in json.loads(args.tune_check.read_text())["rows"] if r["data"] == "textile"]
        check = tune_check(rows, batch_size=args.batch_size)
        for c in check["candidates"]:
            print(f"{c['name']:16s} synthetic {c['synthetic_auroc']:.3f} real {c['real_auroc']:.3f}")
        print(
            f"Spearman {check['spearman']:.3f}; pick {check['pick']} (real {check['pick_real_auroc']:.3f}), "
            f"best {check['best']} (real {check['best_real_auroc']:.3f})"
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "tune_check.json", check)
        return 0
    named = args.settings if args.settings is not None else ([] if args.setting else list(SETTINGS))
    runs = [(name, SETTINGS[name]) for name in named] + list(args.setting)
    rows = []
    for data in args.data:
        for name, settings in runs:
            row = run_one(data, name, settings, args.batch_size)
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        flat = [{**r, "by_type": json.dumps(r["by_type"]), "settings": json.dumps(r["settings"])} for r in rows]
        write_csv(args.out / "accuracy.csv", COLUMNS, flat)
        write_json(args.out / "accuracy.json", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
