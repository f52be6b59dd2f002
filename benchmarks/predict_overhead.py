"""Prediction cost over the backbone forward alone, at the default settings, side by side.

    python benchmarks/predict_overhead.py [--train 100] [--test 40]

Fits a default model on textile training images, then times per image (batch 1, images already decoded):
the backbone alone, and score_samples with the `exact` (default) and `exact-fp32` search backends; best of two.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.datasets import textile
from patchcore.imaging import load_image, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=40)
    args = parser.parse_args()
    data = textile()
    model = PatchCore().fit(data.train[: args.train])
    arrays = [load_image(s.path) for s in data.test[: args.test]]
    cfg, backbone = model.config, model.backbone_
    inputs = [preprocess(a, cfg.resize, cfg.input_size, backbone.mean, backbone.std)[0][None] for a in arrays]
    state = model.get_state()
    variants = {search: PatchCore.from_state(state, search=search) for search in ("exact", "exact-fp32")}
    best: dict[str, float] = {}
    scores = {}
    for _ in range(2):
        started = time.perf_counter()
        with torch.inference_mode():
            for x in inputs:
                backbone(x)
        best["backbone"] = min(best.get("backbone", np.inf), (time.perf_counter() - started) / len(inputs))
        for search, variant in variants.items():
            started = time.perf_counter()
            scores[search] = variant.score_samples(arrays)
            best[search] = min(best.get(search, np.inf), (time.perf_counter() - started) / len(arrays))
    for name, seconds in best.items():
        print(f"{name}_seconds_per_image: {seconds:.4f}")
    for search in variants:
        print(f"predict_over_backbone_{search.replace('-', '_')}: {best[search] / best['backbone']:.2f}")
    drift = np.max(np.abs(scores["exact"] - scores["exact-fp32"]) / scores["exact-fp32"])
    print(f"max_relative_score_difference: {drift:.2e}")


if __name__ == "__main__":
    main()
