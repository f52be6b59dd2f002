"""Tests for patchcore.core.coreset.StreamingCoreset: greedy coreset under a bounded memory buffer."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from patchcore.core import coreset
from patchcore.core.coreset import StreamingCoreset, greedy_coreset, random_coreset, rows_for_memory


def make_data(n: int, dim: int, seed: int, kind: str = "clustered") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, dim)).astype(np.float32)
    centers = rng.standard_normal((max(1, n // 20), dim)) * 10
    return (centers[rng.integers(len(centers), size=n)] + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)


def stream(x, max_rows: int, batch: int, **kwargs) -> StreamingCoreset:
    sc = StreamingCoreset(x.shape[1], max_rows, **kwargs)
    for a in range(0, len(x), batch):
        sc.add(x[a : a + batch])
    return sc


def oracle(x, max_rows, n_select, *, seed, shrink=0.5, projection_dim=128) -> np.ndarray:
    """Stream positions the streaming coreset must return, from a plain list model of the spec."""
    keep = max(1, int(max_rows * shrink))
    kept: list[int] = []
    n_red = 0
    for i in range(len(x)):
        if len(kept) == max_rows:  # the buffer would exceed max_rows: reduce first
            sel = greedy_coreset(
                x[kept], keep, projection_dim=projection_dim, seed=coreset._reduction_seed(seed, n_red)
            )
            kept = [kept[j] for j in sorted(sel.tolist())]
            n_red += 1
        kept.append(i)
    return np.asarray(kept)[greedy_coreset(x[kept], n_select, projection_dim=projection_dim, seed=seed)]


def covering_radius(x: np.ndarray, centers: np.ndarray) -> float:
    d = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(axis=1).max()))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n,max_rows,batch", [(300, 300, 300), (300, 300, 7), (120, 300, 1000), (1, 2, 1)])
def test_no_reduction_is_identical_to_greedy_coreset(n, max_rows, batch):
    x = make_data(n, 12, seed=n)
    k = max(1, n // 10)
    sc = stream(x, max_rows, batch, projection_dim=8, seed=5)
    rows, stats = sc.finish(k)
    expected = greedy_coreset(x, k, projection_dim=8, seed=5)
    assert stats["n_reductions"] == 0 and sc.n_seen == n and stats["n_kept"] == n
    np.testing.assert_array_equal(stats["indices"], expected)
    np.testing.assert_array_equal(rows, x[expected])
    assert rows.dtype == np.float32 and rows.shape == (k, 12)


def test_torch_batches_equal_numpy_batches():
    x = make_data(200, 10, seed=1)
    a, _ = stream(x, 64, 25, projection_dim=8, seed=2).finish(20)
    sc = StreamingCoreset(10, 64, projection_dim=8, seed=2)
    for i in range(0, 200, 25):
        sc.add(torch.from_numpy(x[i : i + 25]).double())  # converted to float32 like numpy input
    b, _ = sc.finish(20)
    np.testing.assert_array_equal(a, b)


def test_one_reduction_is_the_greedy_coreset_of_the_full_buffer():
    x = make_data(101, 6, seed=3)
    sc = stream(x, 100, 101, projection_dim=4, seed=7)
    assert sc.n_reductions == 1 and sc.n_kept == 51 and sc.n_seen == 101
    shard = greedy_coreset(x[:100], 50, projection_dim=4, seed=coreset._reduction_seed(7, 0))
    np.testing.assert_array_equal(sc._index[:51], np.r_[np.sort(shard), 100])
    np.testing.assert_array_equal(sc._buffer[:51], x[np.r_[np.sort(shard), 100]])


@pytest.mark.parametrize(
    "n,max_rows,shrink,k,kind",
    [(700, 100, 0.5, 30, "clustered"), (500, 64, 0.25, 10, "gaussian"), (333, 50, 0.9, 40, "clustered")],
)
def test_matches_list_model_of_the_spec(n, max_rows, shrink, k, kind):
    x = make_data(n, 9, seed=n, kind=kind)
    sc = stream(x, max_rows, 37, projection_dim=6, seed=11, shrink=shrink)
    rows, stats = sc.finish(k)
    expected = oracle(x, max_rows, k, seed=11, shrink=shrink, projection_dim=6)
    assert stats["n_reductions"] > 1
    np.testing.assert_array_equal(stats["indices"], expected)
    np.testing.assert_array_equal(rows, x[expected])


def test_result_does_not_depend_on_batch_boundaries():
    x = make_data(450, 8, seed=4)
    results = [stream(x, 80, b, projection_dim=8, seed=1).finish(25) for b in (1, 13, 80, 81, 450)]
    for rows, stats in results[1:]:
        np.testing.assert_array_equal(rows, results[0][0])
        np.testing.assert_array_equal(stats["indices"], results[0][1]["indices"])
        assert stats["n_reductions"] == results[0][1]["n_reductions"]


def test_deterministic_under_seed():
    x = make_data(600, 8, seed=5, kind="gaussian")
    a, sa = stream(x, 100, 50, projection_dim=8, seed=3).finish(30)
    b, sb = stream(x, 100, 50, projection_dim=8, seed=3).finish(30)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa["indices"], sb["indices"])
    _, sc = stream(x, 100, 50, projection_dim=8, seed=4).finish(30)
    assert not np.array_equal(sa["indices"], sc["indices"])


def test_reduction_seeds_differ_per_reduction_and_from_the_base_seed():
    draws = [coreset._reduction_seed(3, r).integers(2**62) for r in range(4)]
    assert len(set(draws)) == 4
    assert np.random.default_rng(3).integers(2**62) not in draws
    assert coreset._reduction_seed(3, 2).integers(2**62) == draws[2]  # deterministic
    assert coreset._reduction_seed(4, 2).integers(2**62) != draws[2]


def test_returned_rows_are_added_rows():
    x = make_data(900, 5, seed=6, kind="gaussian")
    rows, stats = stream(x, 150, 64, projection_dim=5, seed=0).finish(60)
    idx = stats["indices"]
    assert idx.dtype == np.int64 and len(set(idx.tolist())) == 60
    assert idx.min() >= 0 and idx.max() < 900
    np.testing.assert_array_equal(rows, x[idx])  # bitwise the added rows
    as_set = {r.tobytes() for r in x}
    assert all(r.tobytes() in as_set for r in rows)


def test_finish_does_not_change_state_and_returns_a_copy():
    x = make_data(400, 6, seed=8)
    sc = stream(x[:300], 100, 30, projection_dim=6, seed=0)
    rows1, s1 = sc.finish(20)
    rows1[:] = 0  # must not write into the buffer
    rows2, s2 = sc.finish(20)
    np.testing.assert_array_equal(rows2, x[s1["indices"]])
    np.testing.assert_array_equal(s1["indices"], s2["indices"])
    sc.add(x[300:])  # adding after finish continues the same stream
    rows3, s3 = sc.finish(20)
    rows4, s4 = stream(x, 100, 30, projection_dim=6, seed=0).finish(20)
    np.testing.assert_array_equal(rows3, rows4)
    assert s3["n_seen"] == 400


def test_progress_is_passed_to_the_final_greedy():
    calls: list[int] = []
    stream(make_data(300, 4, seed=0), 100, 50, projection_dim=4).finish(40, progress=calls.append)
    assert calls and calls[-1] == 40 and calls == sorted(calls)


# --------------------------------------------------------------------------- memory and sizes


def test_buffer_is_one_preallocated_array_and_never_exceeds_max_rows():
    x = make_data(1000, 7, seed=9)
    sc = StreamingCoreset(7, 120, projection_dim=7, seed=0)
    buf = sc._buffer
    assert buf.shape == (120, 7) and buf.dtype == np.float32
    for a in range(0, 1000, 45):
        sc.add(x[a : a + 45])
        assert sc._buffer is buf and 1 <= sc.n_kept <= 120
    assert sc.n_seen == 1000 and sc.n_reductions == -(-(1000 - 120) // 60)  # each frees 60 rows
    _, stats = sc.finish(10)
    assert stats["n_kept"] == sc.n_kept and stats["shard_keep"] == 60 and stats["max_rows"] == 120


def test_peak_memory_does_not_grow_with_the_stream():
    dim, max_rows, batch = 32, 400, 100
    # 40x the buffer: one-off allocations (threadpoolctl enumerating every loaded library, more of them
    # when the whole suite has run) stay far below keeping all rows.
    x = make_data(400 * 40, dim, seed=10)

    def peak(n_rows: int) -> int:
        sc = StreamingCoreset(dim, max_rows, projection_dim=8, seed=0)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            for a in range(0, n_rows, batch):
                sc.add(x[a : a + batch])
            sc.finish(50)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def blas_limit_cost() -> int:
        # threadpoolctl enumerates the loaded libraries on every limit: its transient memory grows with what the
        # process has loaded (about 160 kB with torch, 420 kB once pandas and pyarrow, the ray extra's, are in)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            with coreset._single_threaded_blas():
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short, long = peak(3 * max_rows), peak(40 * max_rows)
    buffer_bytes = max_rows * dim * 4
    assert long < short * 1.1 + 64 * 1024  # 40x the rows, same peak
    assert long < 6 * buffer_bytes + 64 * 1024 + blas_limit_cost()  # bounded by a small multiple of the buffer
    assert long < x.nbytes / 2  # far below keeping everything


def test_rows_for_memory():
    assert rows_for_memory(4 * 152 * 1000, 152) == 1000
    assert rows_for_memory(4 * 152 * 1000 + 607, 152) == 1000
    assert rows_for_memory(1, 152) == 1  # at least one
    assert rows_for_memory(2**30, 1) == 2**28
    for args, match in [((0, 4), "max_bytes"), ((100, 0), "dim"), ((1.5, 4), "integer")]:
        with pytest.raises(ValueError, match=match):
            rows_for_memory(*args)


# --------------------------------------------------------------------------- tiny inputs and quality


def test_single_row():
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    sc = StreamingCoreset(3, 2, projection_dim=2)
    sc.add(x)
    rows, stats = sc.finish(1)
    np.testing.assert_array_equal(rows, x)
    assert stats["indices"].tolist() == [0] and stats["n_reductions"] == 0


def test_smallest_buffer_reduces_every_other_row():
    x = make_data(5, 3, seed=0, kind="gaussian")
    sc = stream(x, 2, 1, projection_dim=3, seed=1)  # keeps 1 row per reduction
    assert sc.n_reductions == 3 and sc.n_kept == 2
    rows, stats = sc.finish(2)
    np.testing.assert_array_equal(rows, x[stats["indices"]])
    np.testing.assert_array_equal(stats["indices"], oracle(x, 2, 2, seed=1, projection_dim=3))


def test_empty_batch_is_a_no_op():
    sc = StreamingCoreset(4, 10)
    sc.add(np.zeros((0, 4), np.float32))
    assert sc.n_seen == 0 and sc.n_kept == 0


def test_streaming_still_covers_every_cluster():
    rng = np.random.default_rng(0)
    centers = rng.uniform(-50, 50, size=(12, 2))
    sizes = rng.integers(5, 200, size=12)
    x = np.concatenate([c + rng.standard_normal((s, 2)) for c, s in zip(centers, sizes)]).astype(np.float32)
    x = x[rng.permutation(len(x))]
    rows, _ = stream(x, len(x) // 8, 50, projection_dim=2, seed=0).finish(24)
    radius = covering_radius(x, rows)
    assert radius < 10.0  # every cluster (spread ~1, 12 of them) got a center
    for seed in range(5):
        assert radius <= covering_radius(x, x[random_coreset(len(x), 24, seed=seed)])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rows,match",
    [
        (np.zeros((3, 5), np.float32), r"5 columns .* dim=4; create it with dim=5"),
        (np.zeros(4, np.float32), r"2-D .*reshape\(-1, D\)"),
        (np.zeros((2, 3, 4), np.float32), r"2-D .*reshape\(-1, D\)"),
        (np.array([[0.0, np.nan, 0.0, 0.0]], np.float32), "NaN .* remove or fix"),
        (np.array([[0.0, np.inf, 0.0, 0.0]]), "infinite"),
        (np.array([[1e300, 0.0, 0.0, 0.0]]), "infinite"),  # float64 that overflows float32
        (np.array([["a", "b", "c", "d"]]), "real numbers"),
        (torch.zeros(2, 4, dtype=torch.complex64), "real numbers"),
    ],
)
def test_add_rejects_bad_rows_and_keeps_state(rows, match):
    x = make_data(30, 4, seed=0)
    sc = stream(x, 20, 30, projection_dim=4)
    before = (sc.n_seen, sc.n_kept, sc.n_reductions, sc._buffer.copy())
    with pytest.raises(ValueError, match=match):
        sc.add(rows)
    assert (sc.n_seen, sc.n_kept, sc.n_reductions) == before[:3]
    np.testing.assert_array_equal(sc._buffer, before[3])


def test_n_select_larger_than_kept_names_the_fix():
    x = make_data(1000, 6, seed=1)
    sc = stream(x, 100, 100, projection_dim=6)
    with pytest.raises(ValueError, match=r"only \d+ of 1000 rows are kept .* raise max_rows to at least 240"):
        sc.finish(120)
    rows, _ = stream(x, 240, 100, projection_dim=6).finish(120)  # the suggested size works
    assert rows.shape == (120, 6)
    with pytest.raises(ValueError, match=r"only 30 rows were added"):
        stream(x[:30], 100, 10).finish(31)
    with pytest.raises(ValueError, match="call add"):
        StreamingCoreset(6, 10).finish(1)
    with pytest.raises(ValueError, match=">= 1"):
        sc.finish(0)
    with pytest.raises(ValueError, match="integer"):
        sc.finish(2.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 0}, "dim must be >= 1"),
        ({"max_rows": 1}, "raise max_rows .* or lower shrink"),
        ({"shrink": 0.0}, r"\(0, 1\)"),
        ({"shrink": 1.0}, r"\(0, 1\)"),
        ({"shrink": float("nan")}, r"\(0, 1\)"),
        ({"seed": -1}, "non-negative"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"max_rows": 10.0}, "integer"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"dim": 4, "max_rows": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        StreamingCoreset(**args)


def test_failed_reduction_makes_the_streamer_refuse_further_use():
    x = np.array([[1e30, 0.0], [-1e30, 0.0], [0.0, 1e30]], np.float32)  # finite, too large for distances
    sc = StreamingCoreset(2, 2, projection_dim=2)
    with pytest.raises(ValueError, match="rescale"):
        sc.add(x)
    with pytest.raises(ValueError, match="unusable .* create a new StreamingCoreset"):
        sc.add(np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="unusable"):
        sc.finish(1)
