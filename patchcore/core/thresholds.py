"""Decision thresholds: from good images only (target false-positive rate), from labels (F1), or by hand.

Pure functions on score arrays; the model stores the result and reports, per image, the raw score, the
threshold, a yes/no decision and a normalised score that is exactly 0.5 at the threshold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import PatchCoreError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of a detector and how they were set.

    image / pixel: thresholds on image scores and on anomaly-map pixels (None: not set); method: "fpr"
    (from good images at a target false-positive rate), "f1" (from labelled images) or "manual";
    fpr, n_calibration: the target rate and the number of images used, where they apply.
    """

    image: float | None = None
    pixel: float | None = None
    method: str | None = None
    fpr: float | None = None
    n_calibration: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Thresholds:
        """Thresholds as stored in a model file (None: no thresholds); wrong types raise PatchCoreError."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise PatchCoreError(f"thresholds must be a mapping, not {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise PatchCoreError(f"unknown threshold field(s) {', '.join(unknown)}")
        thresholds = cls(**{key: data.get(key) for key in cls.__dataclass_fields__})
        for name in ("image", "pixel", "fpr"):
            value = getattr(thresholds, name)
            if value is not None and (not is_number(value) or not math.isfinite(value)):
                raise PatchCoreError(f"threshold {name}={value!r} must be a finite number or null")
        if thresholds.method not in (None, "fpr", "f1", "manual"):
            raise PatchCoreError(f"threshold method {thresholds.method!r} is not fpr, f1 or manual")
        if thresholds.n_calibration is not None and not is_count(thresholds.n_calibration):
            raise PatchCoreError(f"n_calibration={thresholds.n_calibration!r} must be a whole number")
        return thresholds


def is_number(value: Any) -> bool:
    """A real number that is not a boolean (JSON's numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: Any, least: int = 0) -> bool:
    """A whole number (not a boolean) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def split_calibration(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, calibration) of n training images; ``share`` of them, at least one, are held out.

    The held-out images never enter the memory bank, so their scores behave like unseen good images.

    >>> split_calibration(5, 0.4, seed=0)
    (array([0, 1, 3]), array([2, 4]))
    """
    if not 0 < share < 1:
        raise PatchCoreError(f"calibration_share={share} must lie in (0, 1), e.g. 0.2")
    n_cal = max(1, int(round(n * share)))
    if n - n_cal < 1:
        raise PatchCoreError(f"{n} training image(s) cannot be split for calibration: add good images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


def fpr_threshold(good_scores: np.ndarray, fpr: float) -> float:
    """(N,) scores of good images -> the threshold above which a fraction ``fpr`` of them would lie.

    >>> fpr_threshold(np.arange(1.0, 101.0), 0.05)
    95.05
    """
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise PatchCoreError("no good images to calibrate the threshold on")
    if not 0 < fpr < 1:
        raise PatchCoreError(f"threshold_fpr={fpr} must lie in (0, 1), e.g. 0.05")
    if scores.size < 1.0 / fpr:
        logger.warning(
            "only %d good calibration images for a %.3g false-positive rate: the threshold is only resolved "
            "to steps of %.3g; give more good images (or a larger --calibration-share)",
            scores.size,
            fpr,
            1.0 / scores.size,
        )
    return float(np.quantile(scores, 1.0 - fpr))


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising F1 of "score >= threshold means defective" on labelled images."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape or labels.all() or not labels.any():
        raise PatchCoreError("an F1 threshold needs scores of both good and defective images")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(~sorted_labels)
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # one candidate per distinct score
    f1 = 2 * tp / (tp + fp + labels.sum())
    best = int(np.argmax(np.where(last, f1, -1.0)))
    return float(sorted_scores[best])


def normalized_scores(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Map non-negative scores (distances) monotonically into [0, 1) with exactly 0.5 at ``threshold``: s / (s + t).

    >>> normalized_scores(np.array([0.0, 1.0, 3.0]), 1.0)
    array([0.  , 0.5 , 0.75])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if threshold <= 0:
        raise PatchCoreError(f"threshold={threshold} must be positive (scores are distances)")
    return scores / (scores + threshold)


def logistic_scores(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Map scores of any sign (standardised ones) monotonically into (0, 1), exactly 0.5 at ``threshold``:
    1 / (1 + exp(t - s)), so one standard deviation above the threshold gives 0.73.

    >>> logistic_scores(np.array([-1.0, 0.5, 2.0]), 0.5).round(3)
    array([0.182, 0.5  , 0.818])
    """
    scores = np.asarray(scores, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * (scores - float(threshold))))  # the logistic, without overflow
