"""Accuracy and time cost of the bounded-memory StreamingCoreset against the full greedy coreset.

Usage:
    python benchmarks/streaming_coreset_bench.py [--data-file BANK.npy] [--n N]
        [--ratios 0.1 0.01] [--fractions 10 4] [--batch 784] [--shrink 0.5] [--seed 0]

Loads a saved ``(N, D)`` float32 memory bank (default: /work/exp/bank_lite0_224_b2b4.npy, real
patch features; if the file is absent, synthetic clustered features from coreset_bench.py are
used instead, ``--n`` rows of ``--dim``). For every coreset ratio it selects with the full
greedy (all rows at once) and with StreamingCoreset at ``max_rows = N // f`` for every
fraction ``f`` (rows added ``--batch`` at a time, in file order, like images arriving one by
one), and prints ``name: value`` lines:

* ``covering_radius_*``: max over all N rows of the Euclidean distance (original space) to
  the nearest selected row, computed in chunks; ``radius_ratio_nF_rR`` = stream / full
  (1.0 = no loss). ``covering_radius_random_rR`` is a uniformly random subset, for scale.
* ``seconds_*``: wall time; the stream's time includes every reduction plus the final
  greedy (``seconds_stream_reduce_nF`` alone is shared by all ratios at that max_rows).
* ``peak_mib_*``: peak traced numpy memory of the selection (tracemalloc), excluding the bank.

A combination where ``n_select`` exceeds what the stream keeps prints ``nan`` and the error.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchcore.core.coreset import StreamingCoreset, coreset_size, greedy_coreset, random_coreset

DEFAULT_BANK = "/work/exp/bank_lite0_224_b2b4.npy"


def covering_radius(x: np.ndarray, centers: np.ndarray, chunk: int = 4096) -> float:
    """max_i min_j |x_i - c_j| in chunks of rows (float32 products on mean-centred data).

    The row attaining the maximum is recomputed in float64 with the difference form.
    """
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    c = centers - mean
    c_norm2 = np.einsum("ij,ij->i", c, c)
    best, best_row = -1.0, 0
    for a in range(0, len(x), chunk):
        xa = x[a : a + chunk] - mean
        d2 = c_norm2[None, :] - 2.0 * (xa @ c.T)
        nearest = d2.min(axis=1) + np.einsum("ij,ij->i", xa, xa)
        i = int(np.argmax(nearest))
        if nearest[i] > best:
            best, best_row = float(nearest[i]), a + i
    diff = centers.astype(np.float64) - x[best_row].astype(np.float64)
    return float(np.sqrt(np.einsum("ij,ij->i", diff, diff).min()))


def traced(fn, *args, **kwargs):
    """Call ``fn``; return (result, wall seconds, peak traced MiB)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
        return result, time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-file", default=DEFAULT_BANK)
    ap.add_argument("--n", type=int, default=None, help="first N rows of the file (default all); synthetic: 156800")
    ap.add_argument("--dim", type=int, default=152, help="synthetic data only")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--fractions", type=int, nargs="+", default=[10, 4], help="max_rows = N // f")
    ap.add_argument("--batch", type=int, default=784, help="rows per add() (784 = one 28x28 feature map)")
    ap.add_argument("--shrink", type=float, default=0.5)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.data_file and Path(args.data_file).is_file():
        x = np.load(args.data_file, mmap_mode="r")
        x = np.ascontiguousarray(x[: args.n] if args.n else x, dtype=np.float32)
        print(f"data: {args.data_file}")
    else:
        from coreset_bench import make_features

        if args.data_file:
            print(f"note: {args.data_file} not found; using synthetic clustered features")
        x = make_features(args.n or 156800, args.dim, "clustered", seed=args.seed)
        print("data: synthetic_clustered")
    n, dim = x.shape
    print(f"n: {n}")
    print(f"dim: {dim}")
    print(f"batch: {args.batch}")
    print(f"shrink: {args.shrink}", flush=True)

    def tag(ratio: float) -> str:
        return f"r{ratio * 100:g}".replace(".", "p")

    full: dict[float, float] = {}
    for ratio in args.ratios:
        k = coreset_size(n, ratio=ratio)
        sel, secs, peak = traced(greedy_coreset, x, k, projection_dim=args.projection_dim, seed=args.seed)
        full[ratio] = covering_radius(x, x[sel])
        print(f"n_select_{tag(ratio)}: {k}")
        print(f"covering_radius_full_{tag(ratio)}: {full[ratio]:.6g}")
        print(f"seconds_full_{tag(ratio)}: {secs:.2f}")
        print(f"peak_mib_full_{tag(ratio)}: {peak:.1f}")
        rnd = covering_radius(x, x[random_coreset(n, k, seed=args.seed)])
        print(f"covering_radius_random_{tag(ratio)}: {rnd:.6g}", flush=True)

    for f in args.fractions:
        max_rows = n // f

        def run_stream(max_rows: int = max_rows) -> StreamingCoreset:
            sc = StreamingCoreset(dim, max_rows, projection_dim=args.projection_dim, seed=args.seed, shrink=args.shrink)
            for a in range(0, n, args.batch):
                sc.add(x[a : a + args.batch])
            return sc

        sc, add_secs, peak = traced(run_stream)
        print(f"max_rows_n{f}: {max_rows}")
        print(f"reductions_n{f}: {sc.n_reductions}")
        print(f"kept_n{f}: {sc.n_kept}")
        print(f"seconds_stream_reduce_n{f}: {add_secs:.2f}")
        print(f"peak_mib_stream_reduce_n{f}: {peak:.1f}", flush=True)
        for ratio in args.ratios:
            k = coreset_size(n, ratio=ratio)
            name = f"n{f}_{tag(ratio)}"
            try:
                (rows, _), secs, peak = traced(sc.finish, k)
            except ValueError as exc:
                print(f"covering_radius_stream_{name}: nan")
                print(f"radius_ratio_{name}: nan")
                print(f"infeasible_{name}: {exc}", flush=True)
                continue
            radius = covering_radius(x, rows)
            print(f"covering_radius_stream_{name}: {radius:.6g}")
            print(f"radius_ratio_{name}: {radius / full[ratio]:.4f}")
            print(f"seconds_stream_{name}: {add_secs + secs:.2f}")
            print(f"seconds_stream_finish_{name}: {secs:.2f}")
            print(f"peak_mib_stream_{name}: {max(peak, 0):.1f}", flush=True)


if __name__ == "__main__":
    main()
