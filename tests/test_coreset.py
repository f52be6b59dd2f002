"""Tests for patchcore.core.coreset: the fast greedy coreset must equal the reference loop exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchcore.core import coreset
from patchcore.core.coreset import (
    coreset_size,
    greedy_coreset,
    greedy_coreset_reference,
    random_coreset,
    random_projection,
)


@pytest.fixture(params=[(3, None), (256, None), (16, 2)], ids=["tiny-blocks", "default-blocks", "narrow-filter"])
def block_size(request, monkeypatch):
    """Run block-sensitive tests with many tiny blocks, with the default size, and with a
    2-dimensional matrix filter (a loose partial-distance bound: many pairs reach the exact step)."""
    size, filter_dim = request.param
    monkeypatch.setattr(coreset, "_BLOCK_SIZE", size)
    monkeypatch.setattr(coreset, "_FILTER_DIM", filter_dim)
    return size


def make_data(kind: str, n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, dim)).astype(np.float32)
    if kind == "clustered":
        centers = rng.standard_normal((max(1, n // 20), dim)) * 10
        x = centers[rng.integers(len(centers), size=n)] + 0.1 * rng.standard_normal((n, dim))
        return x.astype(np.float32)
    if kind == "duplicates":  # few distinct rows: exact distance ties everywhere
        base = rng.integers(-2, 3, size=(max(1, n // 5), dim)).astype(np.float32)
        return base[rng.integers(len(base), size=n)]
    raise AssertionError(kind)


def expected_start(n: int, dim: int, projection_dim: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    random_projection(dim, projection_dim, rng)
    return int(rng.integers(n))


def covering_radius(x: np.ndarray, selected: np.ndarray) -> float:
    d = ((x[:, None, :] - x[selected][None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(axis=1).max()))


# --------------------------------------------------------------------------- fast == reference


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 400),
    dim=st.integers(1, 40),
    frac=st.floats(0.0, 1.0),
    projection_dim=st.integers(1, 48),
    kind=st.sampled_from(["gaussian", "clustered", "duplicates"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fast_equals_reference(block_size, n, dim, frac, projection_dim, kind, seed):
    x = make_data(kind, n, dim, seed)
    n_select = max(1, min(n, round(frac * n)))
    fast = greedy_coreset(x, n_select, projection_dim=projection_dim, seed=seed)
    ref = greedy_coreset_reference(x, n_select, projection_dim=projection_dim, seed=seed)
    np.testing.assert_array_equal(fast, ref)
    assert fast.dtype == np.int64 and fast.shape == (n_select,)


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "duplicates"])
@pytest.mark.parametrize("n,dim,n_select", [(2000, 64, 400), (800, 7, 800), (3000, 152, 300)])
def test_fast_equals_reference_larger(block_size, kind, n, dim, n_select):
    x = make_data(kind, n, dim, seed=n + dim)
    fast = greedy_coreset(x, n_select, seed=3)
    ref = greedy_coreset_reference(x, n_select, seed=3)
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda x: x + 1e4, id="large-offset"),
        pytest.param(lambda x: x * 1e-18, id="tiny-scale"),
        pytest.param(lambda x: x * 1e15, id="large-scale"),
        pytest.param(lambda x: np.round(x * 4) / 4, id="coarse-grid-ties"),
    ],
)
def test_fast_equals_reference_numerically_awkward(block_size, transform):
    x = transform(make_data("clustered", 600, 12, seed=1)).astype(np.float32)
    fast = greedy_coreset(x, 200, projection_dim=16, seed=2)
    ref = greedy_coreset_reference(x, 200, projection_dim=16, seed=2)
    np.testing.assert_array_equal(fast, ref)


def test_all_rows_identical_repeats_like_reference(block_size):
    x = np.ones((50, 5), dtype=np.float32)
    fast = greedy_coreset(x, 10, projection_dim=4, seed=0)
    ref = greedy_coreset_reference(x, 10, projection_dim=4, seed=0)
    np.testing.assert_array_equal(fast, ref)
    # all distances are 0 after the first pick, so np.argmax picks row 0 from then on
    assert fast[0] == expected_start(50, 5, 4, 0)
    assert (fast[1:] == 0).all()


def test_torch_input_equals_numpy_input():
    x = make_data("clustered", 500, 24, seed=4)
    from_numpy = greedy_coreset(x, 50, projection_dim=16, seed=9)
    from_torch = greedy_coreset(torch.from_numpy(x), 50, projection_dim=16, seed=9)
    np.testing.assert_array_equal(from_numpy, from_torch)
    np.testing.assert_array_equal(
        greedy_coreset_reference(torch.from_numpy(x), 50, projection_dim=16, seed=9), from_numpy
    )


def test_generator_seed_equals_int_seed():
    x = make_data("gaussian", 300, 10, seed=0)
    a = greedy_coreset(x, 30, seed=np.random.default_rng(123))
    b = greedy_coreset(x, 30, seed=123)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- properties


def test_squared_distances_row_independent():
    rng = np.random.default_rng(0)
    for dim in (1, 3, 8, 17, 128, 129):
        z = (rng.standard_normal((257, dim)) * rng.uniform(0.1, 100)).astype(np.float32)
        center = z[5]
        full = coreset._squared_distances(z, center)
        assert full.dtype == np.float32
        idx = rng.permutation(257)[:40]
        np.testing.assert_array_equal(coreset._squared_distances(z[idx], center), full[idx])
        for i in (0, 100, 256):
            assert coreset._squared_distances(z[i : i + 1], center)[0] == full[i]
        # one center per row (pairwise form) gives the same values as a broadcast center
        pairwise = coreset._squared_distances(z[idx], np.repeat(center[None], idx.size, axis=0))
        np.testing.assert_array_equal(pairwise, full[idx])


def test_filter_basis_finds_the_leading_axes():
    rng = np.random.default_rng(0)
    # variance in 3 directions of 40, plus faint noise: 8 axes (3 rounded up to a multiple of 8)
    x = rng.standard_normal((2000, 3)) @ rng.standard_normal((3, 40)) * 5 + 0.01 * rng.standard_normal((2000, 40))
    x = x.astype(np.float32)
    mean, basis, norm = coreset._filter_basis(x)
    assert basis.shape == (40, 8)
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-12)
    assert 1.0 <= norm < 1.0 + 1e-9
    np.testing.assert_allclose(mean, x.mean(axis=0, dtype=np.float64))
    # the partial distance along the axes is a lower bound and carries nearly all of it
    d_full = ((x[:100, None] - x[None, :100]) ** 2).sum(-1)
    d_part = (((x[:100] - mean) @ basis)[:, None] - ((x[:100] - mean) @ basis)[None]) ** 2
    assert (d_part.sum(-1) <= d_full * (1 + 1e-5) + 1e-9).all()
    assert d_part.sum(-1).sum() > 0.99 * d_full.sum()


def test_selection_properties():
    n, dim, k = 400, 16, 60
    x = make_data("gaussian", n, dim, seed=7)
    sel = greedy_coreset(x, k, projection_dim=32, seed=11)
    assert sel.shape == (k,) and sel.dtype == np.int64
    assert len(set(sel.tolist())) == k  # distinct rows -> distinct picks
    assert sel.min() >= 0 and sel.max() < n
    assert sel[0] == expected_start(n, dim, 32, 11)
    np.testing.assert_array_equal(sel, greedy_coreset(x, k, projection_dim=32, seed=11))
    assert not np.array_equal(sel, greedy_coreset(x, k, projection_dim=32, seed=12))


def test_n_select_equal_to_n_selects_every_row():
    x = make_data("gaussian", 50, 3, seed=1)
    sel = greedy_coreset(x, 50, projection_dim=8, seed=0)
    assert sorted(sel.tolist()) == list(range(50))


def test_greedy_covers_better_than_random():
    rng = np.random.default_rng(0)
    centers = rng.uniform(-50, 50, size=(12, 2))
    sizes = rng.integers(5, 200, size=12)  # unequal clusters: random sampling misses small ones
    x = np.concatenate([c + rng.standard_normal((s, 2)) for c, s in zip(centers, sizes)]).astype(np.float32)
    k = 24
    greedy = greedy_coreset(x, k, projection_dim=2, seed=0)
    greedy_radius = covering_radius(x, greedy)
    for seed in range(5):
        assert greedy_radius <= covering_radius(x, random_coreset(len(x), k, seed=seed))
    # and it is within the 2-approximation of k-center: every cluster gets a center
    assert greedy_radius < 10.0


def test_progress_is_reported():
    calls: list[int] = []
    greedy_coreset(make_data("gaussian", 300, 4, seed=0), 250, projection_dim=4, progress=calls.append)
    assert calls and calls[-1] == 250
    assert calls == sorted(calls)


def test_projection_map():
    rng = np.random.default_rng(0)
    p = random_projection(64, 256, rng)
    assert p.shape == (64, 256) and p.dtype == np.float32
    assert abs(p.var() - 1 / 256) < 0.1 / 256
    assert abs(p.mean()) < 1e-3
    np.testing.assert_array_equal(p, random_projection(64, 256, np.random.default_rng(0)))
    # projection_dim >= dim is still a random map, not the identity
    q = random_projection(3, 3, np.random.default_rng(1))
    assert not np.allclose(q, np.eye(3))
    with pytest.raises(ValueError, match="Generator"):
        random_projection(3, 3, 0)
    with pytest.raises(ValueError, match=">= 1"):
        random_projection(0, 3, rng)


def test_projection_preserves_distances_roughly():
    x = make_data("gaussian", 50, 1024, seed=3)
    z = x @ random_projection(1024, 256, np.random.default_rng(0))
    d_x = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(50, 1)]
    d_z = np.linalg.norm(z[:, None] - z[None], axis=-1)[np.triu_indices(50, 1)]
    ratio = d_z / d_x
    assert 0.8 < ratio.min() and ratio.max() < 1.2


# --------------------------------------------------------------------------- sizes and errors


def test_coreset_size_rules():
    assert coreset_size(1000, ratio=0.1) == 100
    assert coreset_size(1000, ratio=0.1, size=7) == 7  # absolute size wins
    assert coreset_size(10, size=50) == 10  # clipped to n
    assert coreset_size(10, ratio=0.01) == 1  # at least one
    assert coreset_size(10, ratio=1.0) == 10
    assert coreset_size(7, ratio=0.5) == round(3.5)
    assert coreset_size(1, ratio=1e-9) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 0.0}, r"\(0, 1\]"),
        ({"ratio": 1.5}, r"\(0, 1\]"),
        ({"ratio": -0.1}, r"\(0, 1\]"),
        ({"ratio": float("nan")}, r"\(0, 1\]"),
        ({}, "either"),
        ({"size": 0}, ">= 1"),
        ({"size": 2.5}, "integer"),
    ],
)
def test_coreset_size_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coreset_size(100, **kwargs)


def test_coreset_size_rejects_bad_n():
    with pytest.raises(ValueError, match="n must be >= 1"):
        coreset_size(0, ratio=0.5)


@pytest.mark.parametrize("fn", [greedy_coreset, greedy_coreset_reference])
@pytest.mark.parametrize(
    "features,n_select,match",
    [
        (np.zeros((10, 3), np.float32), 11, r"n_select must be in \[1, 10\]"),
        (np.zeros((10, 3), np.float32), 0, r"n_select must be in \[1, 10\]"),
        (np.zeros(10, np.float32), 1, "2-D"),
        (np.zeros((2, 5, 3), np.float32), 1, "reshape"),
        (np.zeros((0, 3), np.float32), 1, "at least one row"),
        (np.array([[0.0, np.nan], [1.0, 2.0]], np.float32), 1, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]], np.float32), 1, "infinite"),
        (np.array([[1e30, 0.0], [-1e30, 0.0]], np.float32), 1, "rescale"),
        (np.array([["a", "b"]]), 1, "real numbers"),
    ],
)
def test_greedy_input_errors(fn, features, n_select, match):
    with pytest.raises(ValueError, match=match):
        fn(features, n_select, projection_dim=4)


def test_greedy_rejects_bad_projection_dim():
    with pytest.raises(ValueError, match="projection_dim"):
        greedy_coreset(np.zeros((4, 2), np.float32), 2, projection_dim=0)


def test_float64_and_integer_inputs_are_converted():
    x = make_data("gaussian", 100, 5, seed=0)
    a = greedy_coreset(x, 10, projection_dim=4)
    np.testing.assert_array_equal(a, greedy_coreset(x.astype(np.float64), 10, projection_dim=4))
    ints = np.arange(40).reshape(20, 2)
    np.testing.assert_array_equal(
        greedy_coreset(ints, 5, projection_dim=2), greedy_coreset_reference(ints, 5, projection_dim=2)
    )


# --------------------------------------------------------------------------- random coreset


def test_random_coreset():
    sel = random_coreset(100, 30, seed=5)
    assert sel.shape == (30,) and sel.dtype == np.int64
    assert len(set(sel.tolist())) == 30
    assert sel.min() >= 0 and sel.max() < 100
    np.testing.assert_array_equal(sel, random_coreset(100, 30, seed=5))
    np.testing.assert_array_equal(sel, random_coreset(100, 30, seed=np.random.default_rng(5)))
    assert not np.array_equal(sel, random_coreset(100, 30, seed=6))
    assert sorted(random_coreset(10, 10).tolist()) == list(range(10))


@pytest.mark.parametrize("n,n_select", [(10, 11), (10, 0), (0, 1)])
def test_random_coreset_errors(n, n_select):
    with pytest.raises(ValueError, match="must be"):
        random_coreset(n, n_select)
