"""What each part of the default model contributes on textile: the bank alone, the global branch alone, both.

    python benchmarks/global_branch_parts.py [--layers blocks.2 blocks.2+blocks.3]

For each layer set, one model is fitted as the defaults fit it (the seeded 20% of the 200 training images held
out); its bank scores and its global branch's Mahalanobis distances are then read apart on the 600 test
images, and image AUROC (good vs all / local / global) is printed for the bank alone, the branch alone and
the model's own score (the larger of the bank's and the branch's on the bank's scale).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.datasets import textile
from patchcore.detectors.global_branch import input_means
from patchcore.evaluation.metrics import auroc


def parts(model: PatchCore, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(bank scores (N,), branch distances (N,)) of ``images`` under a fitted model with a global branch."""
    bank, means = [], []
    for batch in model._features(images, model.backbone_, "scoring"):
        with torch.inference_mode():
            bank += model._bank_scores(batch)
        means.append(input_means(batch))
    return np.array(bank), model.global_.distances(np.concatenate(means))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.2+blocks.3"], help="+-joined layer sets")
    args = parser.parse_args()
    data = textile()
    paths = [s.path for s in data.test]
    labels = np.array([s.label for s in data.test])
    kinds = np.array([s.defect_type for s in data.test])

    def aurocs(scores: np.ndarray) -> str:
        values = [auroc(labels, scores)]
        for kind in ("local", "global"):
            keep = (kinds == "good") | (kinds == kind)
            values.append(auroc(labels[keep], scores[keep]))
        return " / ".join(f"{v:.3f}" for v in values)

    print("| layers | bank alone | branch alone | model (larger of the two) |")
    print("|---|---|---|---|")
    for layer_set in args.layers:
        model = PatchCore(layers=tuple(layer_set.split("+"))).fit(data.train)
        bank, distances = parts(model, paths)
        combined = model.score_samples(paths)
        print(f"| {layer_set} | {aurocs(bank)} | {aurocs(distances)} | {aurocs(combined)} |", flush=True)


if __name__ == "__main__":
    main()
