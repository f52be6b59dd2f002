"""Tests for patchcore.core.two_level: the two-level greedy coreset of a stream of features."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore.core.coreset import greedy_coreset, random_projection
from patchcore.core.two_level import TwoLevelCoreset, greedy_dense, shard_keep


def make_data(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered rows: a few dozen tight clusters, like patch features of one texture."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 20), dim)) * 10
    return (centers[rng.integers(len(centers), size=n)] + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)


def stream(x: np.ndarray, cuts, **kwargs) -> TwoLevelCoreset:
    """A TwoLevelCoreset fed ``x`` in batches of the sizes ``cuts`` (cycled)."""
    tl = TwoLevelCoreset(x.shape[1], **kwargs)
    a, i = 0, 0
    while a < len(x):
        size = max(1, cuts[i % len(cuts)])
        tl.add(x[a : a + size])
        a, i = a + size, i + 1
    return tl


def oracle(x: np.ndarray, n_select: int, *, keep: int, exact_rows: int, shard_rows: int, seed: int, pdim: int):
    """Stream positions the two-level coreset must return, and its shards' selections, from the spec."""
    if len(x) <= exact_rows:
        return greedy_coreset(x, n_select, projection_dim=pdim, seed=seed), []
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 + 1,)))
    p = random_projection(x.shape[1], pdim, rng)
    union, shards = [], []
    full = len(x) - len(x) % shard_rows
    for a in range(0, full, shard_rows):
        start = int(rng.integers(shard_rows))
        sel = (
            np.arange(shard_rows)
            if keep >= shard_rows
            else np.sort(greedy_dense(x[a : a + shard_rows] @ p, keep, start))
        )
        union.append(a + sel)
        shards.append((a, a + sel))
    union.append(np.arange(full, len(x)))
    union = np.concatenate(union)
    return union[greedy_coreset(x[union], n_select, projection_dim=pdim, seed=seed)], shards


def radius(x: np.ndarray, centers: np.ndarray) -> float:
    """Covering radius in float64: max over rows of the distance to the nearest center."""
    x, centers = x.astype(np.float64), centers.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return float(np.sqrt(np.maximum(d.min(axis=1), 0).max()))


# --------------------------------------------------------------------------- the definition


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    dim=st.integers(1, 9),
    batch=st.lists(st.integers(1, 400), min_size=1, max_size=4),
    slack=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_a_stream_that_fits_is_exactly_the_greedy(n, dim, batch, slack, seed):
    x = make_data(n, dim, seed)
    k = max(1, n // 7)
    rows, stats = stream(
        x, batch, shard_keep=2, exact_rows=n + slack, shard_rows=16, projection_dim=5, seed=seed
    ).finish(k)
    expected = greedy_coreset(x, k, projection_dim=5, seed=seed)
    assert stats["exact"] and stats["n_shards"] == 0 and stats["n_kept"] == n
    np.testing.assert_array_equal(stats["indices"], expected)
    np.testing.assert_array_equal(rows, x[expected])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 400),
    exact_rows=st.integers(0, 120),
    shard_rows=st.integers(1, 64),
    keep=st.integers(1, 70),
    batch=st.lists(st.integers(1, 500), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_the_stream_follows_the_definition_however_it_is_cut(n, exact_rows, shard_rows, keep, batch, seed):
    x = make_data(n, 6, seed)
    tl = stream(x, batch, shard_keep=keep, exact_rows=exact_rows, shard_rows=shard_rows, projection_dim=4, seed=seed)
    k = min(tl.n_kept, max(1, n // 9))
    rows, stats = tl.finish(k)
    expected, _ = oracle(x, k, keep=keep, exact_rows=exact_rows, shard_rows=shard_rows, seed=seed, pdim=4)
    np.testing.assert_array_equal(stats["indices"], expected)
    np.testing.assert_array_equal(rows, x[expected])
    assert stats["exact"] == (n <= exact_rows) and stats["n_seen"] == n
    assert stats["n_shards"] == (0 if n <= exact_rows else n // shard_rows)
    assert len(set(stats["indices"].tolist())) == k  # distinct rows


@settings(max_examples=25, deadline=None)
@given(n=st.integers(50, 500), shard_rows=st.integers(8, 100), keep=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_covering_radius_is_at_most_the_shards_plus_the_final_greedy(n, shard_rows, keep, seed):
    # Every row is within its shard's radius of a kept row, which is within the final radius of a center.
    x = make_data(n, 5, seed)
    kw = {"keep": keep, "exact_rows": 0, "shard_rows": shard_rows, "seed": seed, "pdim": 5}
    tl = stream(x, [97], shard_keep=keep, exact_rows=0, shard_rows=shard_rows, projection_dim=5, seed=seed)
    k = min(tl.n_kept, max(1, n // 10))
    _, stats = tl.finish(k)
    _, shards = oracle(x, k, **kw)
    union = np.concatenate([sel for _, sel in shards] + [np.arange(n - n % shard_rows, n)])
    shard_radius = max([radius(x[a : a + shard_rows], x[sel]) for a, sel in shards], default=0.0)
    final_radius = radius(x[union], x[stats["indices"]])
    assert radius(x, x[stats["indices"]]) <= (shard_radius + final_radius) * (1 + 1e-9) + 1e-9


def test_close_to_the_exact_greedy_on_clustered_features():
    x = make_data(6000, 16, seed=3)
    k = 60  # 1%
    exact = greedy_coreset(x, k, projection_dim=16, seed=0)
    keep = shard_keep(0.01, shard_rows=512)
    tl = stream(x, [700], shard_keep=keep, exact_rows=0, shard_rows=512, projection_dim=16, seed=0)
    _, stats = tl.finish(k)
    assert stats["n_shards"] == 11 and stats["n_kept"] == 11 * keep + 6000 - 11 * 512
    assert radius(x, x[stats["indices"]]) <= 1.1 * radius(x, x[exact])


def test_torch_batches_equal_numpy_batches():
    x = make_data(300, 7, seed=1)
    kw = {"shard_keep": 5, "exact_rows": 50, "shard_rows": 40, "projection_dim": 6, "seed": 2}
    a = stream(x, [33], **kw).finish(20)[1]["indices"]
    tl = TwoLevelCoreset(7, **kw)
    for i in range(0, 300, 33):
        tl.add(torch.from_numpy(x[i : i + 33]).double())
    np.testing.assert_array_equal(a, tl.finish(20)[1]["indices"])


def test_finish_does_not_change_the_state():
    x = make_data(500, 4, seed=2)
    kw = {"shard_keep": 4, "exact_rows": 100, "shard_rows": 32, "projection_dim": 4, "seed": 1}
    tl = stream(x[:300], [64], **kw)
    first = tl.finish(10)[1]["indices"]
    np.testing.assert_array_equal(first, tl.finish(10)[1]["indices"])
    tl.add(x[300:])
    np.testing.assert_array_equal(tl.finish(30)[1]["indices"], stream(x, [64], **kw).finish(30)[1]["indices"])


def test_memory_stays_flat_after_the_overflow():
    # 400 batches of 256 rows x 32 dims (12.5 MiB in all): the state holds one shard and the union only.
    tl = TwoLevelCoreset(32, 8, exact_rows=2048, shard_rows=512, projection_dim=8, seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((256, 32), dtype=np.float32) for _ in range(400)]
    tracemalloc.start()
    try:
        for batch in batches:
            tl.add(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tl.n_shards == 200 and tl.n_kept == 200 * 8
    assert peak < 1.5 * 2**20  # the 2048-row buffer (256 KiB), a shard's temporaries and the union


# --------------------------------------------------------------------------- the shards' greedy


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), dim=st.integers(1, 8), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_greedy_dense_follows_the_greedy_rule(n, dim, frac, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, dim)) * rng.uniform(0.1, 100)).astype(np.float32)
    k = max(1, int(frac * n))
    start = int(rng.integers(n))
    sel = greedy_dense(z, k, start)
    assert sel[0] == start and len(set(sel.tolist())) == k
    z64 = z.astype(np.float64)
    scale = float((z64 - z64.mean(0)).__pow__(2).sum(1).max()) + 1e-30
    for i in range(1, k):  # the chosen row is (up to float32 rounding) the farthest from those chosen before
        d = ((z64[:, None] - z64[sel[:i]][None]) ** 2).sum(-1).min(1)
        assert d[sel[i]] >= d.max() - 1e-4 * scale


def test_greedy_dense_keeps_duplicates_distinct():
    z = np.zeros((10, 3), np.float32)
    assert sorted(greedy_dense(z, 10, 4).tolist()) == list(range(10))


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((3, 2)), 1, 0), "float32"),
        ((np.zeros((3, 2), np.float32), 4, 0), "n_select"),
        ((np.zeros((3, 2), np.float32), 1, 3), "start"),
    ],
)
def test_greedy_dense_errors(args, match):
    with pytest.raises(ValueError, match=match):
        greedy_dense(*args)


# --------------------------------------------------------------------------- sizes and errors


def test_shard_keep_rules():
    assert shard_keep(0.01) == 82  # ceil(2 x 1% x 4096)
    assert shard_keep(0.1, shard_rows=100) == 20 and shard_keep(1.0, shard_rows=100) == 100
    assert shard_keep(1e-9) == 1
    assert shard_keep(None, 5243, exact_rows=524288) == 82  # an absolute size counts against exact_rows
    with pytest.raises(ValueError, match="ratio"):
        shard_keep(None)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="shard_keep"):
        TwoLevelCoreset(4, 0)
    with pytest.raises(ValueError, match="exact_rows"):
        TwoLevelCoreset(4, 2, exact_rows=-1)
    tl = TwoLevelCoreset(4, 2, exact_rows=10, shard_rows=8)
    with pytest.raises(ValueError, match="no rows"):
        tl.finish(1)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        tl.add(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        tl.add(np.full((3, 4), np.nan, np.float32))
    assert tl.n_seen == 0  # nothing was taken from a refused batch
    tl.add(np.random.default_rng(0).standard_normal((40, 4)))
    assert tl.n_shards == 5 and tl.n_kept == 10
    with pytest.raises(ValueError, match="shard_keep"):
        tl.finish(11)
