"""Evaluate a fitted model on a data set's test split: scores, image/pixel metrics, timings."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .data import GOOD, Dataset
from .errors import PatchCoreError
from .images import mask_to_input, read_mask_file
from .metrics import auroc, pixel_auroc, pro_score
from .model import PatchCore

logger = logging.getLogger(__name__)


def evaluate(model: PatchCore, dataset: Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict every test image of ``dataset``; return (metrics, one row per test image).

    Pixel metrics (``pixel_auroc``, ``pro``) are taken at the model's input resolution (the cropped
    square the backbone sees), with masks resized (nearest) and cropped exactly like their images.
    """
    test = dataset.test
    if not test:
        raise PatchCoreError(f"{dataset.name}: no test split to evaluate (MVTec layout: put images in test/<type>/)")
    labels = np.array([s.label for s in test])
    if labels.min() == labels.max():
        raise PatchCoreError(f"{dataset.name}: the test split needs both good and defective images for an AUROC")
    with_masks = dataset.has_masks
    cfg = model.config
    scores = np.empty(len(test))
    maps = np.empty((len(test), cfg.input_size, cfg.input_size), np.float32) if with_masks else None
    paths = [s.path for s in test]
    started = time.perf_counter()
    if maps is None:
        scores[:] = model.score_samples(paths)
    else:
        for i, (score, amap, _) in enumerate(model.predict_with_input_maps(paths)):
            scores[i], maps[i] = score, amap
    predict_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {"image_auroc": auroc(labels, scores), "image_auroc_by_type": {}}
    good = np.array([s.defect_type == GOOD for s in test])
    for defect_type in sorted({s.defect_type for s in test} - {GOOD}):
        chosen = good | np.array([s.defect_type == defect_type for s in test])
        metrics["image_auroc_by_type"][defect_type] = auroc(labels[chosen], scores[chosen])
    if maps is not None:
        masks = np.stack([
            mask_to_input(read_mask_file(s.mask_path), cfg.resize, cfg.input_size)
            if s.mask_path is not None else np.zeros((cfg.input_size,) * 2, bool)
            for s in test
        ])
        metrics["pixel_auroc"] = pixel_auroc(masks, maps)
        metrics["pro"] = pro_score(masks, maps)
        metrics["pixel_metrics_resolution"] = cfg.input_size
    stats = getattr(model, "fit_stats_", {})
    metrics.update(
        n_train=model.n_train_,
        n_test=len(test),
        memory_bank_size=int(model.memory_bank_.shape[0]),
        feature_seconds=stats.get("feature_seconds"),
        coreset_seconds=stats.get("coreset_seconds"),
        fit_seconds=stats.get("fit_seconds"),
        predict_seconds_per_image=predict_seconds / len(test),
    )
    threshold = model.threshold_
    if threshold is not None:
        flagged = scores >= threshold
        metrics.update(
            threshold=threshold,
            false_positive_rate_at_threshold=float(flagged[labels == 0].mean()),
            true_positive_rate_at_threshold=float(flagged[labels == 1].mean()),
        )
    rows = [
        {"path": str(s.path), "score": float(score), **model.decide(float(score)), "label": s.label, "defect_type": s.defect_type}
        for s, score in zip(test, scores)
    ]
    return metrics, rows
