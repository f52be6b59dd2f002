"""Tests for patchcore.evaluation.metrics (AUROC, pixel AUROC, PRO)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from patchcore.evaluation.metrics import (
    auroc,
    image_auroc,
    pixel_auroc,
    pro_curve,
    pro_score,
    roc_curve,
)

_trapezoid = getattr(np, "trapezoid", None) or np.trapz

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def random_blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool masks with a few random blobs; some images defect-free.

    Always has at least one defect pixel and at least one defect-free pixel.
    """
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < 0.3:
            continue  # defect-free image
        seeds = rng.random((h, w)) < rng.uniform(0.02, 0.2)
        masks[i] = ndimage.binary_dilation(seeds) if rng.random() < 0.5 else seeds
    if not masks.any():
        masks[rng.integers(n), rng.integers(h), rng.integers(w)] = True
    if masks.all():
        masks[0, 0, 0] = False
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """Random maps, often with many ties, loosely correlated with the masks."""
    kind = rng.integers(3)
    if kind == 0:  # heavy ties
        maps = rng.integers(0, int(rng.integers(2, 6)), size=masks.shape).astype(np.float64)
    elif kind == 1:  # continuous
        maps = rng.random(masks.shape)
    else:  # rounded -> some ties
        maps = np.round(rng.random(masks.shape) * 20) / 20
    return maps + rng.uniform(0, 1.5) * masks * rng.integers(0, 3, size=masks.shape)


def reference_pro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Brute force PRO: loop over every threshold, compute everything naively."""
    regions = []
    for i in range(masks.shape[0]):
        labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3), dtype=int))
        for r in range(1, n + 1):
            regions.append((i, labelled == r))
    negatives = ~masks.astype(bool)
    n_negatives = negatives.sum()

    thresholds = [np.inf] + sorted(np.unique(maps).tolist(), reverse=True)
    fprs, pros = [], []
    for t in thresholds:
        predicted = maps >= t
        fprs.append((predicted & negatives).sum() / n_negatives)
        overlaps = [predicted[i][region].sum() / region.sum() for i, region in regions]
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)

    keep = fprs <= max_fpr  # fprs is non-decreasing, so this is a prefix
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < max_fpr:
        j = int(np.argmax(fprs > max_fpr))
        x0, x1, y0, y1 = fprs[j - 1], fprs[j], pros[j - 1], pros[j]
        x.append(max_fpr)
        y.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(_trapezoid(y, x) / max_fpr)


@st.composite
def labels_and_scores(draw):
    n = draw(st.integers(2, 60))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    assume(0 < sum(labels) < n)
    if draw(st.booleans()):  # many ties
        scores = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    else:
        scores = draw(
            st.lists(
                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                min_size=n,
                max_size=n,
            )
        )
    return np.array(labels), np.array(scores, dtype=np.float64)


# --------------------------------------------------------------------------- #
# ROC / AUROC
# --------------------------------------------------------------------------- #
@FAST
@given(labels_and_scores())
def test_auroc_matches_sklearn(data):
    labels, scores = data
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@FAST
@given(labels_and_scores())
def test_auroc_is_mann_whitney(data):
    labels, scores = data
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    u = (diff > 0).sum() + 0.5 * (diff == 0).sum()
    assert auroc(labels.astype(bool), scores) == pytest.approx(u / diff.size, abs=1e-12)


@FAST
@given(labels_and_scores())
def test_roc_curve_matches_sklearn(data):
    labels, scores = data
    fpr, tpr, thr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert np.isinf(thr[0])
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert len(thr) == len(np.unique(scores)) + 1  # one point per distinct score


def test_auroc_known_values():
    labels = np.array([0, 0, 1, 1, 0, 1])
    perfect = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    assert auroc(labels, perfect) == 1.0
    assert auroc(labels, -perfect) == 0.0
    assert auroc(labels, np.full(6, 3.0)) == 0.5
    assert image_auroc(labels.astype(bool), perfect) == 1.0
    # one tie between a positive and a negative counts 1/2 (3.5 of 4 pairs)
    assert auroc([0, 1, 0, 1], [0.0, 1.0, 0.5, 0.5]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
        ([0, 0], [0.1, 0.2], "both classes"),
        ([0, 1, 1], [0.1, 0.2], "same shape"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "finite"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "finite"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1], ["a", "b"], "real-valued"),
    ],
)
def test_auroc_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auroc(labels, scores)
    with pytest.raises(ValueError, match=match):
        image_auroc(labels, scores)


def test_roc_curve_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([0, 1], [0.0, np.nan])


# --------------------------------------------------------------------------- #
# pixel AUROC
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 6, 24, 20)
    maps = random_maps(rng, masks).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_errors():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="both classes"):
        pixel_auroc(np.zeros((2, 4, 4), bool), maps)
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(np.zeros((2, 4, 5), bool), maps)
    with pytest.raises(ValueError, match="0 and 1"):
        pixel_auroc(np.full((2, 4, 4), 255, np.uint8), maps)


# --------------------------------------------------------------------------- #
# PRO
# --------------------------------------------------------------------------- #
@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    max_fpr=st.sampled_from([0.3, 0.3, 0.05, 0.5, 1.0]),
)
def test_pro_matches_brute_force(seed, n, h, w, max_fpr):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, n, h, w)
    maps = random_maps(rng, masks)
    expected = reference_pro(masks, maps, max_fpr)
    got = pro_score(masks, maps, max_fpr=max_fpr)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("seed", range(3))
def test_pro_matches_brute_force_larger(seed):
    rng = np.random.default_rng(100 + seed)
    masks = random_blob_masks(rng, 5, 20, 18)
    maps = random_maps(rng, masks)
    assert pro_score(masks, maps) == pytest.approx(reference_pro(masks, maps), abs=1e-9)


def test_pro_curve_hand_computed():
    # one image, one 1-pixel region, 4 negatives; the top score is a negative
    masks = np.array([[[1, 0, 0, 0, 0]]])
    maps = np.array([[[0.5, 1.0, 0.2, 0.1, 0.0]]])
    fpr, pro = pro_curve(masks, maps, max_fpr=0.3)
    np.testing.assert_allclose(fpr, [0.0, 0.25, 0.25, 0.3])
    np.testing.assert_allclose(pro, [0.0, 0.0, 1.0, 1.0])
    assert pro_score(masks, maps) == pytest.approx(0.05 / 0.3, abs=1e-12)

    # a defect-free image only adds negatives (here all scored below everything)
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    maps2 = np.concatenate([maps, np.full_like(maps, -1.0)])
    assert pro_score(masks2, maps2) == pytest.approx((0.3 - 1 / 9) / 0.3, abs=1e-12)


def test_pro_uses_8_connectivity():
    # a horizontal pair plus a diagonal neighbour: one 8-connected region of 3
    # pixels (4-connectivity would give regions of 2 and 1 -> PRO(t) = 0.5)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 2] = 1.0  # hit only the diagonal pixel
    fpr, pro = pro_curve(masks, maps, max_fpr=1.0)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1 / 3, 1.0])


def test_pro_averages_over_all_regions_of_all_images():
    # image 0 has 1 region, image 1 has 3 regions; only image 0's region is hit:
    # mean over all 4 regions = 1/4 (a per-image mean would give 1/2)
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 0] = masks[1, 0, 4] = masks[1, 4, 2] = True
    maps = masks.astype(float)
    maps[1] = 0.0
    fpr, pro = pro_curve(masks, maps, max_fpr=1.0)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 1.0])


def test_pro_perfect_and_anticorrelated():
    rng = np.random.default_rng(3)
    masks = random_blob_masks(rng, 4, 16, 16)
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    jittered = masks.astype(float) + 0.1 * masks * rng.random(masks.shape)
    assert pro_score(masks, jittered) == pytest.approx(1.0, abs=1e-12)
    anti = (1.0 - masks) + 0.1 * rng.random(masks.shape)
    assert pro_score(masks, anti) < 1e-12
    noise = rng.random(masks.shape)
    assert 0.0 < pro_score(masks, noise) < 0.5


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    transform=st.sampled_from(
        [
            lambda x: np.exp(x / 2.0),
            lambda x: x**3 + x,
            lambda x: 10.0 * x - 3.0,
            lambda x: np.arctan(x),
        ]
    ),
)
def test_pro_invariant_to_increasing_transforms(seed, transform):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 3, 8, 8)
    maps = rng.integers(0, 12, size=masks.shape).astype(float)
    maps += 3.0 * masks * rng.integers(0, 2, size=masks.shape)
    assert pro_score(masks, transform(maps)) == pytest.approx(pro_score(masks, maps), abs=1e-12)


def test_pro_accepts_single_2d_image():
    rng = np.random.default_rng(2)
    masks = random_blob_masks(rng, 1, 10, 12)
    maps = random_maps(rng, masks)
    assert pro_score(masks[0], maps[0]) == pytest.approx(reference_pro(masks, maps), abs=1e-9)


def test_pro_curve_shape_and_monotone():
    rng = np.random.default_rng(7)
    masks = random_blob_masks(rng, 4, 12, 12)
    maps = random_maps(rng, masks)
    fpr, pro = pro_curve(masks, maps, max_fpr=0.3)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == pytest.approx(0.3, abs=1e-15)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.all((pro >= 0) & (pro <= 1))


def test_pro_num_thresholds():
    rng = np.random.default_rng(11)
    masks = random_blob_masks(rng, 4, 16, 16)
    # integer maps 0..10: 11 evenly spaced thresholds hit every distinct value -> exact
    maps = rng.integers(0, 11, size=masks.shape).astype(float)
    maps += 4 * masks * rng.random(masks.shape).round()
    maps = np.minimum(maps, 10.0)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 10.0
    exact_int = pro_score(masks, maps)
    assert pro_score(masks, maps, num_thresholds=11) == pytest.approx(exact_int, abs=1e-12)
    # continuous maps: a fine grid approximates the exact value
    cont = rng.random(masks.shape) + 0.3 * masks
    exact = pro_score(masks, cont)
    approx = pro_score(masks, cont, num_thresholds=5000)
    assert approx == pytest.approx(exact, abs=5e-3)
    assert pro_score(masks, cont, num_thresholds=3) != pytest.approx(exact, abs=1e-6)


def test_pro_is_fast_on_many_distinct_scores():
    rng = np.random.default_rng(5)
    masks = random_blob_masks(rng, 20, 128, 128)
    maps = rng.random(masks.shape).astype(np.float32)  # ~330k distinct thresholds
    start = time.perf_counter()
    value = pro_score(masks, maps)
    assert time.perf_counter() - start < 5.0  # a per-threshold loop would take minutes
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize(
    "masks, maps, kwargs, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), {}, "at least one defect region"),
        (np.ones((1, 4, 4)), np.zeros((1, 4, 4)), {}, "defect-free pixel"),
        (np.eye(4)[None], np.zeros((1, 4, 5)), {}, "same shape"),
        (np.eye(4)[None], np.full((1, 4, 4), np.nan), {}, "finite"),
        (2 * np.eye(4)[None], np.zeros((1, 4, 4)), {}, "0 and 1"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"max_fpr": 0.0}, "max_fpr"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"max_fpr": 1.5}, "max_fpr"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"num_thresholds": 1}, "num_thresholds"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"num_thresholds": 2.5}, "num_thresholds"),
        (np.eye(4)[None, None], np.zeros((1, 1, 4, 4)), {}, r"\(N, H, W\)"),
    ],
)
def test_pro_errors(masks, maps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pro_score(masks, maps, **kwargs)
    with pytest.raises(ValueError, match=match):
        pro_curve(masks, maps, **kwargs)
