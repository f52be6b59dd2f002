"""Evaluate a fitted model on a data set's test split: scores, image/pixel metrics, timings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import GOOD, Dataset
from .errors import PatchCoreError
from .images import mask_to_map, read_mask_file
from .metrics import auroc, pixel_auroc, pro_curve
from .model import PatchCore

logger = logging.getLogger(__name__)


PRO_MAX_FPR = 0.3  # the MVTec AD convention


def evaluate(
    model: PatchCore,
    dataset: Dataset,
    *,
    on_map: Callable[[int, Any, float, np.ndarray, Any], None] | None = None,
    curves: dict | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict every test image of ``dataset``; return (metrics, one row per test image).

    Pixel metrics (``pixel_auroc``, ``pro``) are taken at the resolution of the maps the model yields:
    its input resolution (the cropped square the backbone sees; with keep_aspect and no crop, each image's
    resized shape), or with tiling the (tile_scale-scaled) original image, with masks resized (nearest) and
    cropped exactly like their images. When map sizes differ between images, ``pro`` is None (it needs
    one size) and ``pixel_auroc`` pools every pixel of every image.

    ``on_map(index, sample, score, map, geometry)``, when given, is called for every test image with its
    anomaly map at input resolution (maps are then computed even without masks); the time it takes is
    not counted in ``predict_seconds_per_image``. ``curves``, when given a dict, receives ``"pro"``:
    ``{"fpr", "pro", "max_fpr"}``, the PRO curve, whenever ``pro`` is computed.
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
    maps: list[np.ndarray] | None = [] if with_masks else None
    geometries = []
    paths = [s.path for s in test]
    started = time.perf_counter()
    callback_seconds = 0.0
    if maps is None and on_map is None:
        scores[:] = model.score_samples(paths)
    else:
        for i, (score, amap, geometry) in enumerate(model.predict_with_input_maps(paths)):
            scores[i] = score
            if maps is not None:
                maps.append(amap)
                geometries.append(geometry)
            if on_map is not None:
                called = time.perf_counter()
                on_map(i, test[i], score, amap, geometry)
                callback_seconds += time.perf_counter() - called
    predict_seconds = time.perf_counter() - started - callback_seconds

    metrics: dict[str, Any] = {"image_auroc": auroc(labels, scores), "image_auroc_by_type": {}}
    good = np.array([s.defect_type == GOOD for s in test])
    for defect_type in sorted({s.defect_type for s in test} - {GOOD}):
        chosen = good | np.array([s.defect_type == defect_type for s in test])
        metrics["image_auroc_by_type"][defect_type] = auroc(labels[chosen], scores[chosen])
    if maps is not None:
        masks = [
            mask_to_map(read_mask_file(s.mask_path), geometry) if s.mask_path is not None else np.zeros(amap.shape, bool)
            for s, amap, geometry in zip(test, maps, geometries)
        ]
        shapes = {m.shape for m in maps}
        if len(shapes) == 1:
            masks, maps = np.stack(masks), np.stack(maps)
            metrics["pixel_auroc"] = pixel_auroc(masks, maps)
            fpr, pro = pro_curve(masks, maps, max_fpr=PRO_MAX_FPR)
            area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)  # as metrics.pro_score, from one curve
            metrics["pro"] = min(max(area / PRO_MAX_FPR, 0.0), 1.0)
            if curves is not None:
                curves["pro"] = {"fpr": fpr, "pro": pro, "max_fpr": PRO_MAX_FPR}
            (h, w), = shapes
            metrics["pixel_metrics_resolution"] = h if h == w and cfg.tile_size is None else [h, w]
        else:  # keep_aspect without crop, or tiling, on images of several sizes: pool the pixels
            flat = lambda arrays: np.concatenate([a.ravel() for a in arrays])[None, None]  # noqa: E731
            metrics["pixel_auroc"] = pixel_auroc(flat(masks), flat(maps))
            metrics["pro"] = None
            metrics["pixel_metrics_resolution"] = "mixed"
            logger.warning("test images give maps of %d different sizes: pro is skipped (it needs one size)", len(shapes))
    stats = getattr(model, "fit_stats_", {})
    metrics.update(
        n_train=model.n_train_,
        n_test=len(test),
        memory_bank_size=model.memory_bank_size,
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
