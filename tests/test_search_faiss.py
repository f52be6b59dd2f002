"""The optional faiss backend: same contract as search.knn (flat, ivf at nprobe=nlist), good recall (hnsw).

Every test but the missing-faiss one takes the ``faiss`` fixture, which skips when faiss is not
installed (pytest.importorskip); the missing-faiss test hides faiss itself, so it runs either way.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from patchcore.core.knn import knn
from patchcore.errors import PatchCoreError
from patchcore.search.faiss_index import INDEX_KINDS, FaissIndex, default_nlist


@pytest.fixture
def faiss():
    return pytest.importorskip("faiss")


def random_data(m=2000, q=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    bank = torch.from_numpy(rng.standard_normal((m, d), dtype=np.float32))
    queries = torch.from_numpy(rng.standard_normal((q, d), dtype=np.float32))
    return bank, queries


def assert_same_as_exact(dists, idx, exact_d, exact_i):
    """Distances allclose; indices equal wherever the exact k-th and (k+1)-th distances are not tied."""
    assert dists.dtype == torch.float32 and idx.dtype == torch.int64
    assert dists.shape == idx.shape == exact_d.shape
    torch.testing.assert_close(dists, exact_d, rtol=1e-4, atol=1e-4)
    # a position is unambiguous when its exact distance is clear of its neighbours' in the ranking
    gap = torch.full_like(exact_d, float("inf"))
    diffs = exact_d[:, 1:] - exact_d[:, :-1]
    gap[:, 1:] = torch.minimum(gap[:, 1:], diffs)
    gap[:, :-1] = torch.minimum(gap[:, :-1], diffs)
    clear = gap > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], exact_i[clear])


def test_missing_faiss_error_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    bank, _ = random_data(m=10, q=1, d=4)
    for kind in INDEX_KINDS:
        with pytest.raises(PatchCoreError, match=r"pip install 'patchcore\[faiss\]'") as info:
            FaissIndex(bank, kind)
        assert str(info.value) == "the faiss search backend needs: pip install 'patchcore[faiss]'"
        assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize("k", [1, 5])
def test_flat_equals_exact_knn(faiss, k):
    bank, queries = random_data()
    exact_d, exact_i = knn(queries, bank, k)
    dists, idx = FaissIndex(bank, "flat").search(queries, k)
    assert_same_as_exact(dists, idx, exact_d, exact_i)
    assert (dists[:, 1:] >= dists[:, :-1]).all()


def test_flat_accepts_numpy_bank_and_finds_bank_rows(faiss):
    bank, _ = random_data(m=500)
    index = FaissIndex(bank.numpy(), "flat")
    dists, idx = index.search(bank[:50], 1)
    assert torch.equal(idx[:, 0], torch.arange(50))
    assert (dists >= 0).all() and dists.max() < 1e-3  # clamped at 0, never negative


@pytest.mark.parametrize("k", [1, 4])
def test_ivf_with_all_cells_probed_equals_exact(faiss, k):
    bank, queries = random_data()
    nlist = 40
    index = FaissIndex(bank, "ivf", nlist=nlist, nprobe=nlist)
    assert index.nprobe == nlist
    dists, idx = index.search(queries, k)
    assert_same_as_exact(dists, idx, *knn(queries, bank, k))


def test_ivf_default_nlist_and_nprobe_clamped(faiss):
    bank, queries = random_data(m=4000)
    index = FaissIndex(bank, "ivf", nprobe=10_000)
    assert index.nlist == default_nlist(4000) == 102  # 39 rows per cell, below 4 sqrt(4000) = 253
    assert default_nlist(100_000) == 1265 and default_nlist(10) == 1
    assert index.nprobe == index.nlist
    assert_same_as_exact(*index.search(queries, 3), *knn(queries, bank, 3))


def test_ivf_few_probes_returns_valid_approximate_answers(faiss):
    bank, queries = random_data()
    exact_d, _ = knn(queries, bank, 10)
    # one probe of 64 cells: some queries' cell holds fewer than k rows -> exact fallback, no -1
    dists, idx = FaissIndex(bank, "ivf", nlist=64, nprobe=1).search(queries, 10)
    assert (idx >= 0).all() and (idx < bank.shape[0]).all()
    assert (dists >= exact_d - 1e-4).all()  # true distances to the rows found: never below exact
    true = ((queries[:, None, :] - bank[idx]) ** 2).sum(-1)
    torch.testing.assert_close(dists, true, rtol=1e-4, atol=1e-4)


def test_hnsw_recall_at_1(faiss):
    bank, queries = random_data(m=5000, q=500, d=32)
    _, exact_i = knn(queries, bank, 1)
    dists, idx = FaissIndex(bank, "hnsw").search(queries, 1)
    recall = (idx[:, 0] == exact_i[:, 0]).float().mean().item()
    assert recall >= 0.95
    assert (dists >= 0).all()


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_same_bank_and_seed_same_results(faiss, kind):
    bank, queries = random_data(m=3000, q=200, d=16)
    options = {"ivf": {"nprobe": 2}, "hnsw": {"ef_search": 8, "hnsw_m": 8}}.get(kind, {})
    first = FaissIndex(bank, kind, seed=3, **options).search(queries, 5)
    second = FaissIndex(bank.clone(), kind, seed=3, threads=1, **options).search(queries, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_shapes_and_dtypes(faiss, kind):
    bank, queries = random_data(m=300, q=7, d=8)
    index = FaissIndex(bank, kind)
    dists, idx = index.search(queries, 3)
    assert dists.shape == idx.shape == (7, 3)
    assert dists.dtype == torch.float32 and idx.dtype == torch.int64
    assert dists.device == queries.device
    empty_d, empty_i = index.search(queries[:0], 2)
    assert empty_d.shape == empty_i.shape == (0, 2)
    assert kind in repr(index)


def test_errors(faiss):
    bank, queries = random_data(m=50, q=5, d=8)
    with pytest.raises(ValueError, match="unknown faiss index kind"):
        FaissIndex(bank, "lsh")
    with pytest.raises(ValueError, match="2-D"):
        FaissIndex(bank[0], "flat")
    with pytest.raises(ValueError, match="at least one row"):
        FaissIndex(bank[:0], "flat")
    with pytest.raises(ValueError, match="NaN"):
        FaissIndex(torch.full((4, 3), float("nan")), "flat")
    with pytest.raises(ValueError, match="nlist"):
        FaissIndex(bank, "ivf", nlist=51)
    with pytest.raises(ValueError, match="nprobe"):
        FaissIndex(bank, "ivf", nprobe=0)
    with pytest.raises(ValueError, match="threads"):
        FaissIndex(bank, "flat", threads=0)
    index = FaissIndex(bank, "flat")
    with pytest.raises(ValueError, match=r"\(Q, 8\)"):
        index.search(queries[:, :4])
    with pytest.raises(ValueError, match=r"\(Q, 8\)"):
        index.search(queries[0])
    for bad_k in (0, 51):
        with pytest.raises(ValueError, match="between 1 and the bank size 50"):
            index.search(queries, bad_k)
