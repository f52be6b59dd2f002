"""Evaluate a fitted detector on a data set's test split: scores, image/pixel metrics, timings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..datasets import GOOD, Dataset, Sample
from ..detectors.base import Scorer
from ..errors import PatchCoreError
from ..imaging import Geometry, TiledGeometry, mask_to_map, read_mask_file
from .metrics import auroc, one_against_good, pixel_auroc, pro_area, pro_curve

logger = logging.getLogger(__name__)

PRO_MAX_FPR = 0.3  # the MVTec AD convention
OnMap = Callable[[int, Sample, float, np.ndarray, "Geometry | TiledGeometry"], None]


def evaluate(
    detector: Scorer,
    dataset: Dataset,
    *,
    on_map: OnMap | None = None,
    curves: dict | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict every test image of ``dataset``; return (metrics, one row per test image).

    Pixel metrics (``pixel_auroc``, ``pro``) are taken at the resolution of the maps the detector yields:
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
    scores = np.empty(len(test))
    maps: list[np.ndarray] = []
    geometries: list[Geometry | TiledGeometry] = []
    started = time.perf_counter()
    callback_seconds = 0.0
    for i, result in enumerate(detector.infer([s.path for s in test], maps=with_masks or on_map is not None)):
        scores[i] = result.score
        if with_masks:
            maps.append(result.map())
            geometries.append(result.geometry)
        if on_map is not None:
            called = time.perf_counter()
            on_map(i, test[i], result.score, result.map(), result.geometry)
            callback_seconds += time.perf_counter() - called
    predict_seconds = time.perf_counter() - started - callback_seconds

    types = np.array([s.defect_type for s in test])
    metrics: dict[str, Any] = {
        "image_auroc": auroc(labels, scores),
        "image_auroc_by_type": {t: auroc(labels[m], scores[m]) for t, m in one_against_good(types, GOOD).items()},
    }
    if with_masks:
        metrics.update(_pixel_metrics(test, maps, geometries, curves))
    stats = detector.fit_stats_
    metrics.update(
        n_train=detector.n_train_,
        n_test=len(test),
        memory_bank_size=detector.memory_bank_size,
        feature_seconds=stats.get("feature_seconds"),
        coreset_seconds=stats.get("coreset_seconds"),
        fit_seconds=stats.get("fit_seconds"),
        predict_seconds_per_image=predict_seconds / len(test),
    )
    threshold = detector.threshold_
    if threshold is not None:
        flagged = scores >= threshold
        metrics.update(
            threshold=threshold,
            false_positive_rate_at_threshold=float(flagged[labels == 0].mean()),
            true_positive_rate_at_threshold=float(flagged[labels == 1].mean()),
        )
    rows = [
        {
            "path": str(s.path),
            "score": float(score),
            **detector.decide(float(score)),
            "label": s.label,
            "defect_type": s.defect_type,
        }
        for s, score in zip(test, scores)
    ]
    return metrics, rows


def _pixel_metrics(
    test: list[Sample], maps: list[np.ndarray], geometries: list[Geometry | TiledGeometry], curves: dict | None
) -> dict[str, Any]:
    """pixel_auroc, pro and the resolution they were taken at, with masks transformed like their images."""
    masks = [
        mask_to_map(read_mask_file(s.mask_path), geometry) if s.mask_path is not None else np.zeros(amap.shape, bool)
        for s, amap, geometry in zip(test, maps, geometries)
    ]
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:  # keep_aspect without crop, or tiling, on images of several sizes: pool the pixels
        logger.warning("test images give maps of %d different sizes: pro is skipped (it needs one size)", len(shapes))
        pooled = [np.concatenate([a.ravel() for a in arrays])[None, None] for arrays in (masks, maps)]
        return {"pixel_auroc": pixel_auroc(*pooled), "pro": None, "pixel_metrics_resolution": "mixed"}
    stacked_masks, stacked_maps = np.stack(masks), np.stack(maps)
    fpr, pro = pro_curve(stacked_masks, stacked_maps, max_fpr=PRO_MAX_FPR)
    if curves is not None:
        curves["pro"] = {"fpr": fpr, "pro": pro, "max_fpr": PRO_MAX_FPR}
    ((h, w),) = shapes
    square = h == w and not isinstance(geometries[0], TiledGeometry)
    return {
        "pixel_auroc": pixel_auroc(stacked_masks, stacked_maps),
        "pro": pro_area(fpr, pro, PRO_MAX_FPR),
        "pixel_metrics_resolution": h if square else [h, w],
    }
