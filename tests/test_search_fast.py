"""FilteredExactIndex (bf16 prefilter + fp32 rerank) returns what the exact fp32 knn returns.

Every index is built with ``use_bf16=True`` so the filtered path runs even on CPUs without native bf16
(slower there, equally exact); each test asserts that the filter, not the fallback, was used unless the
test is about the fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore.core.knn import knn
from patchcore.search.bf16 import SLICES, FilteredExactIndex, cpu_has_native_bf16, gamma


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops: one thread keeps the tests fast on a loaded machine (OpenMP barriers stall)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fp32_tolerance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(Q, 1) absolute tolerance at the scale of fp32 rounding in |q|^2 + |b|^2 - 2 q.b (both sides)."""
    d = bank.shape[1]
    bmax = bank.double().norm(dim=1).max()
    scale = (queries.double().norm(dim=1, keepdim=True) + bmax) ** 2
    return 2.0 * gamma(d + 3) * scale


def assert_same_as_knn(index: FilteredExactIndex, queries: torch.Tensor, k: int) -> None:
    bank = index.bank
    dists, idx = index.search(queries, k)
    exact_d, exact_i = knn(queries, bank, k, chunk_size=7)
    assert dists.dtype == torch.float32 and idx.dtype == torch.int64
    assert dists.shape == idx.shape == (queries.shape[0], k)
    tol = fp32_tolerance(queries, bank)
    diff = (dists.double() - exact_d.double()).abs()
    assert bool((diff <= 1e-5 * exact_d.double().abs() + tol).all()), f"max distance diff {diff.max()}"
    assert bool((dists[:, 1:] >= dists[:, :-1]).all()), "distances must ascend"
    # an index may differ from knn's only where the two rows tie: their exact float64 distances agree
    # within fp32 rounding of knn
    true_mine = (queries.double()[:, None, :] - bank.double()[idx]).square().sum(-1)
    true_knn = (queries.double()[:, None, :] - bank.double()[exact_i]).square().sum(-1)
    differ = idx != exact_i
    tied = (true_mine - true_knn).abs() <= 2.0 * tol
    assert bool((~differ | tied).all()), f"{int((differ & ~tied).sum())} non-tied index mismatches"
    # each row's k indices are distinct bank rows
    assert bool((idx.sort(dim=1).values.diff(dim=1) != 0).all()) if k > 1 else True
    assert bool((idx >= 0).all() and (idx < bank.shape[0]).all())


def make(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 120),
    q=st.integers(1, 60),
    d=st.integers(1, 24),
    k=st.integers(1, 5),
    kind=st.sampled_from(["normal", "clustered", "offset", "duplicates", "integer"]),
    block=st.sampled_from([16, 64, 10_000]),
    chunk=st.sampled_from([1, 5, 8192]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_equal_knn(m, q, d, k, kind, block, chunk, seed):
    k = min(k, m)
    rng = np.random.default_rng(seed)
    if kind == "normal":
        bank, queries = rng.standard_normal((m, d)), rng.standard_normal((q, d))
    elif kind == "clustered":
        centers = rng.standard_normal((4, d)) * 10
        bank = centers[rng.integers(0, 4, m)] + 0.1 * rng.standard_normal((m, d))
        queries = centers[rng.integers(0, 4, q)] + 0.1 * rng.standard_normal((q, d))
    elif kind == "offset":  # big norms, small spread: a bound in raw coordinates would be useless
        offset = rng.standard_normal(d) * 1e4
        bank, queries = offset + rng.standard_normal((m, d)), offset + rng.standard_normal((q, d))
    elif kind == "duplicates":  # repeated rows: exact ties
        base = rng.standard_normal((max(1, m // 3), d))
        bank = base[rng.integers(0, base.shape[0], m)]
        queries = np.concatenate([base[rng.integers(0, base.shape[0], q // 2)], rng.standard_normal((q - q // 2, d))])
    else:  # small integers: many exactly tied distances
        bank, queries = rng.integers(-2, 3, (m, d)), rng.integers(-2, 3, (q, d))
    index = FilteredExactIndex(make(bank), chunk_size=chunk, block_elements=block, use_bf16=True, min_queries=1)
    assert index.filtered
    assert_same_as_knn(index, make(queries), k)
    assert index.stats["queries"] == q


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_real_like_clustered_data_uses_the_filter(k):
    rng = np.random.default_rng(k)
    centers = np.abs(rng.standard_normal((32, 48))) * 3
    bank = np.maximum(centers[rng.integers(0, 32, 3000)] + rng.standard_normal((3000, 48)), 0)
    queries = np.maximum(centers[rng.integers(0, 32, 500)] + rng.standard_normal((500, 48)), 0)
    index = FilteredExactIndex(make(bank), block_elements=200_000, use_bf16=True, min_queries=1)
    assert_same_as_knn(index, make(queries), k)
    assert index.stats["fallback_queries"] == 0
    assert index.stats["candidates"] / index.stats["queries"] < 40 * k  # the filter really shortlists


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
def test_large_offsets(offset):
    """Norms dwarf the spread: the bound must be taken in centered coordinates and cover knn's own fp32
    error; with 1e6 the fp32 distances themselves are mostly rounding noise, so rows fall back or tie."""
    rng = np.random.default_rng(1)
    shift = rng.standard_normal(16) * offset
    bank = shift + rng.standard_normal((700, 16))
    queries = shift + rng.standard_normal((90, 16))
    index = FilteredExactIndex(make(bank), use_bf16=True, min_queries=1)
    assert_same_as_knn(index, make(queries), 3)


def test_queries_equal_to_bank_rows_and_exact_ties():
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((200, 10)).astype(np.float32)
    bank[100:] = bank[:100]  # every row twice
    index = FilteredExactIndex(make(bank), use_bf16=True, min_queries=1)
    queries = make(bank[:50])
    dists, idx = index.search(queries, 2)
    assert bool((dists == 0).all())  # both copies at distance 0 (clamped like knn)
    assert bool((idx % 100 == torch.arange(50)[:, None]).all())
    assert_same_as_knn(index, queries, 2)


def test_fallback_path_for_equidistant_bank():
    """Bank rows on a sphere around the queries: the bf16 bound cannot separate them, so the rows fall
    back to the fp32 knn (and the answer is still knn's)."""
    rng = np.random.default_rng(3)
    d = 32
    directions = rng.standard_normal((2000, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = 10.0 * (1.0 + 1e-4 * rng.random(2000))
    bank = directions * radii[:, None]
    queries = 1e-3 * rng.standard_normal((40, d))  # near the centre: all rows about equally far
    index = FilteredExactIndex(make(bank), max_candidates=64, use_bf16=True, min_queries=1)
    assert_same_as_knn(index, make(queries), 2)
    assert index.stats["fallback_queries"] == 40


def test_mixed_fallback_and_filtered_rows_in_one_block():
    rng = np.random.default_rng(4)
    directions = rng.standard_normal((1000, 8))
    bank = 5.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    far = bank[:30] * 1.02 + 1e-3 * rng.standard_normal((30, 8))  # clear nearest row: filtered
    centre = 1e-4 * rng.standard_normal((30, 8))  # all rows nearly tied: fallback
    queries = make(np.concatenate([far, centre])[rng.permutation(60)])
    index = FilteredExactIndex(make(bank), max_candidates=32, use_bf16=True, min_queries=1)
    assert_same_as_knn(index, queries, 1)
    assert 0 < index.stats["fallback_queries"] < 60


def test_non_finite_queries_follow_knn():
    rng = np.random.default_rng(5)
    bank = make(rng.standard_normal((100, 6)))
    queries = make(rng.standard_normal((5, 6)))
    queries[2, 1] = float("inf")
    index = FilteredExactIndex(bank, use_bf16=True, min_queries=1)
    dists, idx = index.search(queries, 1)
    exact_d, exact_i = knn(queries, bank, 1)
    finite = torch.tensor([True, True, False, True, True])
    assert torch.equal(idx[finite], exact_i[finite])
    torch.testing.assert_close(dists[finite], exact_d[finite], rtol=1e-5, atol=1e-5)
    assert index.stats["fallback_queries"] == 1


def test_the_bound_is_needed(monkeypatch):
    """Mutation check: with the error bound set to zero the filter drops true neighbours, and the
    comparison catches it (so the equality tests above can fail)."""
    rng = np.random.default_rng(6)
    bank = make(rng.standard_normal((3000, 4)))  # low dimension: many near ties at bf16 resolution
    queries = make(rng.standard_normal((500, 4)))
    index = FilteredExactIndex(bank, max_candidates=10**6, use_bf16=True, min_queries=1)
    assert_same_as_knn(index, queries, 3)  # the real bound: correct
    zero = lambda nx, nq: (torch.zeros_like(nx, dtype=torch.float64), torch.zeros_like(nx, dtype=torch.float64))
    monkeypatch.setattr(index, "_bound_terms", zero)
    monkeypatch.setattr("patchcore.search.bf16.U_BF16", 0.0)
    with pytest.raises(AssertionError):
        assert_same_as_knn(index, queries, 3)


def test_bound_holds_for_every_pair():
    """|d~ - d| <= u |d~| / (1 - u) + G for all pairs, d in float64 (the derivation, checked directly)."""
    rng = np.random.default_rng(7)
    bank = make(rng.standard_normal((500, 40)) * rng.lognormal(0, 2, (500, 1)) + 50.0)
    queries = make(rng.standard_normal((100, 40)) * 3 + 50.0)
    index = FilteredExactIndex(bank, use_bf16=True, min_queries=1)
    approx, g, _ = index._approx(queries)
    assert approx.shape[1] % SLICES == 0
    assert bool(torch.isinf(approx[:, bank.shape[0] :]).all())  # padding rows never compete
    a = approx[:, : bank.shape[0]].double()
    exact = torch.cdist(queries.double(), bank.double()).square()
    u = 2.0**-8
    assert bool(((a - exact).abs() <= u / (1 - u) * a.abs() + g[:, None]).all())


def test_unsupported_inputs_go_to_knn():
    rng = np.random.default_rng(8)
    bank = torch.from_numpy(rng.standard_normal((50, 4)))  # float64
    index = FilteredExactIndex(bank, use_bf16=True, min_queries=1)
    assert not index.filtered
    d, i = index.search(bank[:3], 1)
    assert d.dtype == torch.float64 and torch.equal(i[:, 0], torch.arange(3))
    off = FilteredExactIndex(bank.float(), use_bf16=False)
    assert not off.filtered
    with pytest.raises(ValueError):
        off.search(bank.float()[:3], 51)


def test_default_exact_backend_is_the_filtered_search_with_the_fp32_answers():
    from patchcore.search import build_index

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    fast, plain = build_index(bank, "exact"), build_index(bank, "exact-fp32")
    assert isinstance(fast, FilteredExactIndex) and fast.filtered == cpu_has_native_bf16()
    d1, i1 = fast.search(queries, 2)
    d2, i2 = plain.search(queries, 2)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)


def test_a_few_queries_go_to_the_plain_product():
    """Eq. 7's support search asks for one query at a time: the filter's fixed costs would dominate."""
    rng = np.random.default_rng(5)
    bank, queries = make(rng.standard_normal((300, 16))), make(rng.standard_normal((40, 16)))
    index = FilteredExactIndex(bank, use_bf16=True, min_queries=8)
    few_d, few_i = index.search(queries[:7], 3)
    assert index.stats["queries"] == 0  # not filtered
    exact_d, exact_i = knn(queries[:7], bank, 3)
    assert torch.equal(few_i, exact_i) and torch.equal(few_d, exact_d)
    index.search(queries[:8], 3)
    assert index.stats["queries"] == 8
