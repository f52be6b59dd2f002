"""Sweep input size, feature levels and patch-score aggregation on the textile protocol.

    python benchmarks/textile_sweep.py --resize 384 --levels 2,3 2,4 --ratio 0.01

Extracts every needed EfficientNet stage once, then for each level pair builds the greedy coreset and
prints the image AUROC (good vs all, vs local, vs global) for several aggregations of the patch scores
(plain L2, no eq. 7 reweighting). This is how the defaults in the README were chosen.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from patchcore.backbones import create_backbone
from patchcore.core.coreset import greedy_coreset
from patchcore.core.features import patch_features
from patchcore.core.knn import knn
from patchcore.datasets import textile
from patchcore.evaluation.metrics import auroc
from patchcore.imaging import load_image, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--resize", type=int, default=384)
    parser.add_argument("--levels", nargs="+", default=["2,3"], help="comma-separated stage pairs, e.g. 2,3 2,4")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--top-k", nargs="+", type=int, default=[1, 3, 10, 20])
    args = parser.parse_args()

    data = textile()
    combos = [tuple(int(i) for i in level.split(",")) for level in args.levels]
    stages = sorted({s for combo in combos for s in combo})
    backbone = create_backbone(args.backbone, [f"blocks.{s}" for s in stages])

    def stage_maps(paths):
        out = {s: [] for s in stages}
        for path in paths:
            x, _ = preprocess(load_image(path), args.resize, args.resize, backbone.mean, backbone.std)
            with torch.inference_mode():
                for s, m in zip(stages, backbone(x[None])):
                    out[s].append(m)
        return {s: torch.cat(v) for s, v in out.items()}

    started = time.perf_counter()
    train, test = stage_maps(data.train), stage_maps([s.path for s in data.test])
    print(f"extract_seconds: {time.perf_counter() - started:.1f}")
    labels = np.array([s.label for s in data.test])
    types = np.array([s.defect_type for s in data.test])
    good = types == "good"
    for combo in combos:
        name = "+".join(f"blocks.{s}" for s in combo)
        bank = patch_features([train[s] for s in combo]).flatten(0, 2)
        queries = patch_features([test[s] for s in combo])
        chosen = greedy_coreset(bank, max(1, int(len(bank) * args.ratio)), seed=0)
        dists, _ = knn(queries.flatten(0, 2), bank[torch.from_numpy(chosen)], 1)
        patch = dists[:, 0].sqrt().reshape(len(queries), -1)
        aggregations = {f"top{k}": patch.topk(k, dim=1).values.mean(1) for k in args.top_k}
        aggregations["mean"] = patch.mean(1)
        for agg, scores in aggregations.items():
            s = scores.numpy()
            figures = [auroc(labels, s)] + [
                auroc(labels[good | (types == t)], s[good | (types == t)]) for t in ("local", "global")
            ]
            print(
                f"{args.backbone} {args.resize}px {name} ratio={args.ratio} {agg}: "
                f"all={figures[0]:.3f} local={figures[1]:.3f} global={figures[2]:.3f}"
            )


if __name__ == "__main__":
    main()
