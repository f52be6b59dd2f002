"""Evaluation metrics for anomaly detection: ROC / AUROC and PRO.

Everything here is plain numpy / scipy and works on whole arrays: scores are
sorted once and all operating points are obtained from cumulative counts, so
there are no Python loops over thresholds or pixels.

Conventions shared by all functions:

* A sample (image or pixel) is *predicted anomalous at threshold t* when its
  score is ``>= t``.
* Curves have one point per distinct score (ties are never split) plus the
  starting point ``(0, 0)`` that belongs to the threshold ``+inf`` (nothing
  predicted).  Between consecutive points curves are linear, which is the
  usual convention (it equals the expected rate of a randomised threshold), and
  is what makes tied scores count 1/2 in the AUROC.
* Labels / masks are binary: ``bool`` or numbers that are exactly 0 or 1.
* Scores / maps must be finite (no NaN, no +-inf).
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = [
    "roc_curve",
    "auroc",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "pro_score",
    "pro_area",
    "one_against_good",
]

logger = logging.getLogger(__name__)

# 8-connectivity for the ground-truth regions of the PRO metric.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _as_binary(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    """Return ``values`` as a boolean array (same shape), or raise ValueError."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{name} must be bool or numeric 0/1 values, got dtype {arr.dtype}; "
            f"convert them with np.asarray({name}) > 0"
        )
    binary = arr != 0
    if arr.size and not np.array_equal(arr, binary):  # values other than 0/1
        bad = arr[(arr != 0) & (arr != 1)]
        raise ValueError(
            f"{name} must contain only 0 and 1 (or bool), found e.g. {bad.flat[0]!r}; "
            f"binarise them first, e.g. {name} = {name} > 0"
        )
    return binary


def _as_scores(values: ArrayLike, name: str) -> NDArray[np.floating]:
    """Return ``values`` as a finite float array (float32 / float64 kept as is)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{name} must be real-valued numbers, got dtype {arr.dtype}; pass anomaly scores as a float array"
        )
    if arr.dtype.kind in "biu" or arr.dtype.itemsize < 4:
        # Bools, integers and float16 -> float64 (exact for ints up to 2**53).
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        raise ValueError(
            f"{name} must be finite, found {n_nan} NaN and "
            f"{int(np.isinf(arr).sum())} infinite values; "
            f"fix or drop those entries (e.g. np.nan_to_num) before evaluating"
        )
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and "
            f"{b.shape}; give exactly one score per label (resize anomaly maps "
            f"to the mask resolution)"
        )


def _check_both_classes(n_pos: int, n_neg: int, name: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{name} must contain both classes 0 and 1 to compute an AUROC "
            f"(got {n_pos} positives and {n_neg} negatives); "
            f"evaluate on a set with normal and anomalous samples"
        )


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not (0.0 < max_fpr <= 1.0):
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}; the usual value for PRO is 0.3")
    return max_fpr


# --------------------------------------------------------------------------- #
# core: sort once, group ties
# --------------------------------------------------------------------------- #
def _descending_groups(
    scores: NDArray[np.floating],
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.floating]]:
    """Sort flat ``scores`` in descending order and group equal values.

    Returns
    -------
    order : (n,) intp
        Permutation such that ``scores[order]`` is non-increasing.
    group_of_sorted : (n,) intp
        ``group_of_sorted[k]`` is the index of the distinct score of the k-th
        sorted element (0 = the largest distinct score).
    distinct : (G,) float
        The distinct scores, decreasing.
    """
    order = np.argsort(scores)[::-1]  # tie order is irrelevant: ties form one group
    sorted_scores = scores[order]
    is_new = np.empty(sorted_scores.shape[0], dtype=bool)
    is_new[:1] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_new[1:])
    group_of_sorted = np.cumsum(is_new, dtype=np.intp)
    group_of_sorted -= 1
    distinct = sorted_scores[is_new]
    return order, group_of_sorted, distinct


def _cumulative_counts(
    labels: NDArray[np.bool_], scores: NDArray[np.floating]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.floating]]:
    """Cumulative (tp, fp) for thresholds at every distinct score.

    Parameters
    ----------
    labels : (n,) bool
    scores : (n,) float, finite

    Returns
    -------
    tps, fps : (G + 1,) int64
        Number of positives / negatives with ``score >= threshold``; entry 0
        belongs to the threshold ``+inf`` and is 0.
    thresholds : (G + 1,) float
        ``[+inf, distinct scores in decreasing order]``.
    """
    order, group_of_sorted, distinct = _descending_groups(scores)
    n_groups = distinct.shape[0]
    labels_sorted = labels[order]
    del order
    group_sizes = np.bincount(group_of_sorted, minlength=n_groups)
    tp_per_group = np.bincount(group_of_sorted[labels_sorted], minlength=n_groups)
    fp_per_group = group_sizes - tp_per_group
    tps = np.zeros(n_groups + 1, dtype=np.int64)
    fps = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(tp_per_group, out=tps[1:])
    np.cumsum(fp_per_group, out=fps[1:])
    thresholds = np.concatenate([np.array([np.inf], dtype=distinct.dtype), distinct])
    return tps, fps, thresholds


def _validated_pair(
    labels: ArrayLike, scores: ArrayLike, labels_name: str, scores_name: str
) -> tuple[NDArray[np.bool_], NDArray[np.floating]]:
    y = _as_binary(labels, labels_name)
    s = _as_scores(scores, scores_name)
    _check_same_shape(y, s, labels_name, scores_name)
    return y.reshape(-1), s.reshape(-1)


def _auroc_from_counts(tps: NDArray[np.int64], fps: NDArray[np.int64]) -> float:
    """Trapezoidal area under the ROC curve, computed in exact integer arithmetic."""
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    # 2 * area * n_pos * n_neg = sum_i dfp_i * (tp_i + tp_{i-1}); exact in int64
    # as long as n_pos * n_neg < 4.6e18 (i.e. n < ~4e9 samples).
    twice_area = int(np.dot(np.diff(fps), tps[1:] + tps[:-1]))
    return twice_area / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------- #
# ROC / AUROC
# --------------------------------------------------------------------------- #
def roc_curve(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.floating]]:
    """Receiver operating characteristic with one point per distinct score.

    Parameters
    ----------
    labels : (N,) bool or 0/1 ints
        1 / True = anomalous (positive).
    scores : (N,) float
        Higher = more anomalous. Must be finite.

    Returns
    -------
    fpr : (G + 1,) float64
        False-positive rate for ``score >= thresholds[i]``; non-decreasing,
        starts at 0 and ends at 1.
    tpr : (G + 1,) float64
        True-positive rate, same layout.
    thresholds : (G + 1,) float
        ``+inf`` followed by the G distinct scores in decreasing order (same
        layout as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).

    Raises
    ------
    ValueError
        If the shapes differ, labels are not binary, scores are not finite or
        only one class is present.
    """
    y, s = _validated_pair(labels, scores, "labels", "scores")
    _check_both_classes(int(y.sum()), int(y.size - y.sum()), "labels")
    tps, fps, thresholds = _cumulative_counts(y, s)
    return fps / fps[-1], tps / tps[-1], thresholds


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve.

    Ties between a positive and a negative count 1/2, so the result equals the
    Mann-Whitney U statistic divided by ``n_pos * n_neg`` (and
    ``sklearn.metrics.roc_auc_score``).

    Parameters
    ----------
    labels : (N,) bool or 0/1 ints (any shape is accepted and flattened)
    scores : same shape as ``labels``, finite floats; higher = more anomalous.

    Returns
    -------
    float in [0, 1]. 1.0 = every positive scores above every negative,
    0.5 = uninformative (e.g. constant scores), 0.0 = perfectly inverted.

    Raises
    ------
    ValueError
        Shape mismatch, non-binary labels, NaN / inf scores, or only one class.

    Examples
    --------
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auroc([0, 1], [0.5, 0.5])  # a tie counts one half
    0.5
    """
    y, s = _validated_pair(labels, scores, "labels", "scores")
    n_pos = int(np.count_nonzero(y))
    _check_both_classes(n_pos, y.size - n_pos, "labels")
    tps, fps, _ = _cumulative_counts(y, s)
    return _auroc_from_counts(tps, fps)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level (detection) AUROC.

    Parameters
    ----------
    labels : (N,) bool or 0/1
        Per test image: 1 if the image contains an anomaly, 0 if it is normal.
    scores : (N,) float
        Per-image anomaly score (for PatchCore: the maximum of the anomaly map,
        possibly re-weighted).

    Returns
    -------
    float in [0, 1]; see :func:`auroc`.
    """
    return auroc(labels, scores)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level (segmentation) AUROC over all pixels of all images.

    Every pixel of every image is one sample: positives are defect pixels of
    the ground-truth masks, negatives all other pixels (including every pixel
    of defect-free images).

    Parameters
    ----------
    masks : (N, H, W) bool or 0/1
        Ground-truth defect masks.
    maps : (N, H, W) float
        Anomaly maps at mask resolution. float32 is kept as float32 (never
        down-cast, which could create ties); 500 x 256 x 256 float32 needs
        about 1 GB of working memory on top of the inputs.

    Returns
    -------
    float in [0, 1]; see :func:`auroc`.

    Raises
    ------
    ValueError
        Shape mismatch, non-binary masks, non-finite maps, or masks that are
        all 0 (or all 1).
    """
    y, s = _validated_pair(masks, maps, "masks", "maps")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            "masks must contain both classes 0 and 1 to compute an AUROC "
            f"(got {n_pos} defect pixels out of {y.size}); pixel AUROC needs "
            "at least one anomalous image with a non-empty mask and some normal pixels"
        )
    logger.debug("pixel_auroc over %d pixels (%d defect)", y.size, n_pos)
    tps, fps, _ = _cumulative_counts(y, s)
    return _auroc_from_counts(tps, fps)


# --------------------------------------------------------------------------- #
# PRO
# --------------------------------------------------------------------------- #
def _label_regions(masks: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """Label the 8-connected defect regions of every image with global ids.

    Parameters
    ----------
    masks : (N, H, W) bool

    Returns
    -------
    regions : (N, H, W) int32
        0 for background, 1..R for the regions (ids are unique over all images).
    n_regions : int
        R.
    """
    regions = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i in range(masks.shape[0]):
        if not masks[i].any():
            continue
        labelled, n = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        inside = labelled > 0
        regions[i][inside] = labelled[inside] + offset
        offset += int(n)
    return regions, offset


def _raw_pro_curve(
    masks: ArrayLike, maps: ArrayLike, num_thresholds: int | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Full PRO curve (FPR from 0 to 1), before truncation at max_fpr.

    Returns ``(fpr, pro)``, both (K,) float64 and non-decreasing, with
    ``(fpr[0], pro[0]) == (0, 0)``.
    """
    mask_arr = _as_binary(masks, "masks")
    map_arr = _as_scores(maps, "maps")
    _check_same_shape(mask_arr, map_arr, "masks", "maps")
    if mask_arr.ndim == 2:
        mask_arr, map_arr = mask_arr[None], map_arr[None]
    if mask_arr.ndim != 3:
        raise ValueError(
            f"masks and maps must have shape (N, H, W), got {mask_arr.shape}; "
            "stack the per-image masks / maps along a first axis"
        )

    regions, n_regions = _label_regions(mask_arr)
    if n_regions == 0:
        raise ValueError(
            "PRO needs at least one defect region in the masks; "
            "include anomalous images with non-empty ground-truth masks"
        )
    region_flat = regions.reshape(-1)
    scores = map_arr.reshape(-1)
    pos_idx = np.flatnonzero(region_flat)
    n_neg = scores.size - pos_idx.size
    if n_neg == 0:
        raise ValueError(
            "PRO needs at least one defect-free pixel to compute the false-positive "
            "rate; include normal images or masks that do not cover whole images"
        )
    # Each defect pixel of region r carries weight 1 / (R * |r|): the PRO at a
    # threshold is then the sum of the weights of the defect pixels above it.
    region_sizes = np.bincount(region_flat[pos_idx], minlength=n_regions + 1)[1:]
    region_weight = 1.0 / (n_regions * region_sizes.astype(np.float64))
    logger.debug(
        "PRO over %d pixels, %d defect pixels in %d regions (num_thresholds=%s)",
        scores.size,
        pos_idx.size,
        n_regions,
        num_thresholds,
    )

    if num_thresholds is None:
        order, group_of_sorted, distinct = _descending_groups(scores)
        n_groups = distinct.shape[0]
        is_pos_sorted = region_flat[order] > 0
        pos_positions = np.flatnonzero(is_pos_sorted)
        pos_groups = group_of_sorted[pos_positions]
        pos_weights = region_weight[region_flat[order[pos_positions]] - 1]
        del order, is_pos_sorted, pos_positions
        group_sizes = np.bincount(group_of_sorted, minlength=n_groups)
        del group_of_sorted
    else:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
            raise ValueError(f"num_thresholds must be None (exact) or an int >= 2, got {num_thresholds!r}")
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 (or None for the exact curve), got {num_thresholds}")
        # Approximation: thresholds evenly spaced in [min, max]; each pixel is
        # counted at every threshold <= its score. Group 0 = highest threshold.
        n_groups = int(num_thresholds)
        thresholds = np.linspace(float(scores.min()), float(scores.max()), n_groups)
        bin_idx = np.searchsorted(thresholds, scores, side="right") - 1  # >= 0
        groups = (n_groups - 1) - bin_idx
        del bin_idx
        pos_groups = groups[pos_idx]
        pos_weights = region_weight[region_flat[pos_idx] - 1]
        group_sizes = np.bincount(groups, minlength=n_groups)
        del groups

    pos_per_group = np.bincount(pos_groups, minlength=n_groups)
    fp_per_group = group_sizes - pos_per_group
    pro_per_group = np.bincount(pos_groups, weights=pos_weights, minlength=n_groups)

    fpr = np.zeros(n_groups + 1, dtype=np.float64)
    pro = np.zeros(n_groups + 1, dtype=np.float64)
    fpr[1:] = np.cumsum(fp_per_group) / n_neg
    np.cumsum(pro_per_group, out=pro[1:])
    # Every defect pixel is counted at the lowest threshold: pin the end to 1
    # exactly (removes float summation error) and keep the curve monotone.
    np.minimum(pro, 1.0, out=pro)
    pro[-1] = 1.0
    return fpr, pro


def _truncate(
    fpr: NDArray[np.float64], pro: NDArray[np.float64], max_fpr: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Keep the points with ``fpr <= max_fpr`` and add one interpolated at max_fpr."""
    # fpr is non-decreasing, fpr[0] == 0 < max_fpr and fpr[-1] == 1 >= max_fpr.
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # first index with fpr > max_fpr
    if k == fpr.shape[0]:  # max_fpr == 1 (or every point is <= max_fpr)
        return fpr.copy(), pro.copy()
    x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)  # x1 > max_fpr >= x0
    return (
        np.append(fpr[:k], max_fpr),
        np.append(pro[:k], y_cut),
    )


def pro_curve(
    masks: ArrayLike,
    maps: ArrayLike,
    max_fpr: float = 0.3,
    num_thresholds: int | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-region-overlap (PRO) curve of Bergmann et al. (MVTec AD), up to max_fpr.

    Ground-truth regions are the 8-connected components of each image's mask.
    For a threshold t, pixels with ``map >= t`` are predicted anomalous and

    * ``FPR(t)`` = predicted defect-free pixels / all defect-free pixels,
      pooled over all images (defect-free images only contribute here);
    * ``PRO(t)`` = mean over all regions of all images of
      ``|region & predicted| / |region|``.

    Parameters
    ----------
    masks : (N, H, W) bool or 0/1
        Ground-truth masks. A single (H, W) image is also accepted.
    maps : (N, H, W) float
        Anomaly maps, same shape, finite.
    max_fpr : float in (0, 1]
        The curve is cut at this FPR; its last point is interpolated linearly
        to lie exactly at ``fpr == max_fpr``.
    num_thresholds : int >= 2 or None
        None (default): exact curve, one point per distinct map value.
        An int: approximate curve using that many thresholds evenly spaced
        between the minimum and maximum map value (no full sort; cheaper for
        very large inputs).

    Returns
    -------
    fpr : (K,) float64
        Non-decreasing, from 0 to ``max_fpr``. Starts with the point (0, 0) of
        the threshold +inf.
    pro : (K,) float64
        Non-decreasing, in [0, 1].

    Raises
    ------
    ValueError
        Shape mismatch, non-binary masks, non-finite maps, bad max_fpr or
        num_thresholds, masks without any defect region, or without any
        defect-free pixel.
    """
    max_fpr = _check_max_fpr(max_fpr)
    fpr, pro = _raw_pro_curve(masks, maps, num_thresholds)
    return _truncate(fpr, pro, max_fpr)


def pro_score(
    masks: ArrayLike,
    maps: ArrayLike,
    max_fpr: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve for FPR in [0, max_fpr].

    Trapezoidal area under :func:`pro_curve` divided by ``max_fpr``.

    Parameters
    ----------
    masks : (N, H, W) bool or 0/1
    maps : (N, H, W) float
    max_fpr : float in (0, 1], default 0.3 (the MVTec AD convention)
    num_thresholds : int >= 2 or None (exact, default); see :func:`pro_curve`.

    Returns
    -------
    float in [0, 1]. 1.0 = every region is fully detected before any
    false positive; ~0 = regions only detected at FPR > max_fpr.

    Raises
    ------
    ValueError
        See :func:`pro_curve`.
    """
    max_fpr = _check_max_fpr(max_fpr)
    fpr, pro = pro_curve(masks, maps, max_fpr=max_fpr, num_thresholds=num_thresholds)
    return pro_area(fpr, pro, max_fpr)


def pro_area(fpr: ArrayLike, pro: ArrayLike, max_fpr: float = 0.3) -> float:
    """Normalised trapezoidal area under a PRO curve that ends at ``max_fpr`` (see :func:`pro_curve`).

    >>> pro_area([0.0, 0.3], [0.0, 1.0])
    0.5
    """
    fpr, pro = np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)
    return min(max(area / max_fpr, 0.0), 1.0)


def one_against_good(types: ArrayLike, good: str = "good") -> dict[str, NDArray[np.bool_]]:
    """For each defect type, the samples of that type and the good ones: ``{type: (N,) bool}``, types sorted.

    The per-type AUROC (and ROC curve) of a type is taken over exactly these samples.

    >>> {k: v.tolist() for k, v in one_against_good(["good", "scratch", "dent", "good"]).items()}
    {'dent': [True, False, True, True], 'scratch': [True, True, False, True]}
    """
    types = np.asarray(types)
    is_good = types == good
    return {str(t): is_good | (types == t) for t in sorted(set(types.tolist()) - {good})}
