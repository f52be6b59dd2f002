"""Incremental fit against a full refit on the textile protocol.

    python benchmarks/incremental_bench.py [--first 100]

Fits on the first N training images, adds the rest with partial_fit, and compares bank size, time and
image AUROC (good vs all / local / global) with one fit on all 200 images, side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from patchcore import PatchCore
from patchcore.datasets import textile
from patchcore.evaluation.metrics import auroc


def figures(model: PatchCore, data) -> dict[str, float]:
    scores = model.score_samples([s.path for s in data.test])
    labels = np.array([s.label for s in data.test])
    types = np.array([s.defect_type for s in data.test])
    out = {"all": auroc(labels, scores)}
    for t in ("local", "global"):
        chosen = (types == "good") | (types == t)
        out[t] = auroc(labels[chosen], scores[chosen])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=100)
    args = parser.parse_args()
    data = textile()
    started = time.perf_counter()
    full = PatchCore().fit(data.train)
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    inc = PatchCore().fit(data.train[: args.first])
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    inc.partial_fit(data.train[args.first :])
    add_seconds = time.perf_counter() - started
    print(f"full_fit_seconds: {full_seconds:.1f}")
    print(f"incremental_first_fit_seconds: {first_seconds:.1f}")
    print(f"incremental_add_seconds: {add_seconds:.1f}")
    print(f"full_bank_size: {full.memory_bank_.shape[0]}")
    print(f"incremental_bank_size: {inc.memory_bank_.shape[0]}")
    for name, model in (("full", full), ("incremental", inc)):
        for key, value in figures(model, data).items():
            print(f"{name}_auroc_{key}: {value:.4f}")


if __name__ == "__main__":
    main()
