"""Decision thresholds: from good images only (target false-positive rate), from labels (F1), or by hand.

Pure functions on score arrays; the model stores the result and reports, per image, the raw score, the
threshold, a yes/no decision and a normalised score that is exactly 0.5 at the threshold.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import PatchCoreError

logger = logging.getLogger(__name__)


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
