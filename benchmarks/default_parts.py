"""What each part of the default model contributes: the fine bank, the coarse bank, the global branch, together.

    python benchmarks/default_parts.py                                   # textile: image AUROC per part
    python benchmarks/default_parts.py --data /tmp/textile_local_masks   # + pixel AUROC and PRO (masks)
    python benchmarks/default_parts.py --setting '{"layers": ["blocks.2", "blocks.3"]}'

One model is fitted per data set as the defaults fit it (plus ``--setting``'s PatchCoreConfig fields; the
seeded 20% of the training images held out to calibrate the branches). Its parts are then evaluated apart on
the same test images, each as a detector of its own: the fine bank alone, the coarse bank alone (its own
scale: an AUROC does not see the affine onto the fine bank's), the fine bank with either branch, and the model
itself. The global branch alone scores images only (its Mahalanobis distances; it has no map). The figures
are image AUROC (good vs all, then per defect type; textile's are local / global), and pixel AUROC and PRO
where every defective test image has a mask (``benchmarks/textile_masks.py`` writes such a folder for
textile's local defects).
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.datasets import open_dataset
from patchcore.detectors.global_branch import input_means
from patchcore.evaluation.evaluate import evaluate
from patchcore.evaluation.metrics import auroc, one_against_good


def without(model: PatchCore, *parts: str) -> PatchCore:
    """A shallow copy of a fitted ``model`` with the named parts (``"coarse_"``, ``"global_"``) left out: it
    shares the backbone and the bank, and scores as the model would without those parts."""
    part = copy.copy(model)
    for name in parts:
        setattr(part, name, None)
    return part


def global_distances(model: PatchCore, images: list[Any]) -> np.ndarray:
    """(N,) the global branch's Mahalanobis distances of ``images`` (its score before the affine)."""
    means = []
    for batch in model._features(images, model.backbone_, "scoring"):
        with torch.inference_mode():
            means.append(input_means(batch))
    return model.global_.distances(np.concatenate(means))


def row(name: str, metrics: dict[str, Any]) -> str:
    by_type = " / ".join(f"{v:.3f}" for _, v in sorted(metrics["image_auroc_by_type"].items()))
    pixel = metrics.get("pixel_auroc")
    pro = metrics.get("pro")
    pixels = "" if pixel is None else f" | {pixel:.3f} | {pro:.3f}" if pro is not None else f" | {pixel:.3f} | -"
    return f"| {name} | {metrics['image_auroc']:.3f} | {by_type}{pixels} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["textile"], help="'textile' and/or MVTec-layout folders")
    parser.add_argument("--setting", type=json.loads, default={}, help="JSON of PatchCoreConfig fields")
    args = parser.parse_args()
    for data in args.data:
        dataset = open_dataset(data)
        model = PatchCore(**args.setting).fit(dataset.train)
        if model.coarse_ is None or model.global_ is None:
            raise SystemExit(f"{data}: the model has no coarse bank or no global branch: too few training images?")
        test = dataset.test
        types = sorted(t for t in {s.defect_type for s in test} if t != "good")
        masks = " | pixel AUROC | PRO" if dataset.has_masks else ""
        print(f"\n{dataset.name} ({len(dataset.train)} training images, {len(test)} test images)")
        print(f"| part | image AUROC | {' / '.join(types)}{masks} |")
        print("|---|---|---|" + ("---|---|" if masks else ""))
        parts = {
            "fine bank alone": without(model, "coarse_", "global_"),
            "coarse bank alone": model.coarse_.model,
            "fine bank + coarse bank": without(model, "global_"),
            "fine bank + global branch": without(model, "coarse_"),
            "the model (all three)": model,
        }
        for name, part in parts.items():
            metrics, _ = evaluate(part, dataset)
            print(row(name, metrics), flush=True)
        labels = np.array([s.label for s in test])
        distances = global_distances(model, [s.path for s in test])
        kinds = np.array([s.defect_type for s in test])
        alone = {
            "image_auroc": auroc(labels, distances),
            "image_auroc_by_type": {
                t: auroc(labels[m], distances[m]) for t, m in one_against_good(kinds, "good").items()
            },
        }
        print(row("global branch alone", alone) + (" (no map) |" if masks else ""), flush=True)


if __name__ == "__main__":
    main()
