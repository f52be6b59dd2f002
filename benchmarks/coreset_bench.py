"""Time the greedy coreset (fast, and optionally the reference loop) on synthetic or saved features.

Usage:
    python benchmarks/coreset_bench.py [--n 156800] [--dim 1024] [--ratio 0.1]
        [--data clustered|gaussian | --data-file BANK.npy] [--reference [--reference-n 20000]]

Prints ``name: value`` lines. ``--data clustered`` (default) imitates CNN patch features: a
mixture of modes, each spread along a few directions of its own, plus small isotropic noise.
``--data gaussian`` is structureless isotropic noise, the worst case for the pruning.
``--data-file`` loads a saved ``(N, D)`` memory bank instead (e.g. real patch features written
with ``np.save``); ``--n`` then takes its first N rows (default: all of them).
Times are wall clock; ``*_cpu_seconds`` is the process CPU time over the same span (on a
busy machine the two differ).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchcore.core.coreset import coreset_size, greedy_coreset, greedy_coreset_reference


def make_features(n: int, dim: int, kind: str, seed: int = 0) -> np.ndarray:
    """Seeded synthetic ``(n, dim)`` float32 features."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, dim), dtype=np.float32)
    n_modes, rank = 100, 16
    x = np.empty((n, dim), dtype=np.float32)
    labels = rng.integers(n_modes, size=n)
    modes = rng.standard_normal((n_modes, dim), dtype=np.float32) * 2.0
    spectrum = (1.0 / np.arange(1, rank + 1, dtype=np.float32)) ** 0.5
    for m in range(n_modes):
        rows = np.flatnonzero(labels == m)
        basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(dim)
        coef = rng.standard_normal((rows.size, rank), dtype=np.float32) * spectrum * rng.uniform(1.0, 4.0)
        x[rows] = modes[m] + coef @ basis * np.sqrt(dim).astype(np.float32)
    x += 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
    return x


def timed(name: str, fn, *args, **kwargs):
    """Call ``fn``; print ``{name}_seconds`` (wall) and ``{name}_cpu_seconds`` (process CPU)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{name}_seconds: {wall:.3f}")
    print(f"{name}_cpu_seconds: {cpu:.3f}", flush=True)
    return result, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="rows (default 156800, or all rows of --data-file)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--data-file", type=Path, default=None, help="a saved (N, D) .npy bank instead of --data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true", help="also time the reference loop and compare")
    parser.add_argument(
        "--reference-n", type=int, default=None, help="run the comparison on the first N rows only (reference is slow)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the library's debug log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    if args.data_file is not None:
        x = np.load(args.data_file, mmap_mode="r")
        x = np.ascontiguousarray(x if args.n is None else x[: args.n], dtype=np.float32)
        data = str(args.data_file)
    else:
        x = make_features(156_800 if args.n is None else args.n, args.dim, args.data, args.seed)
        data = args.data
    n_select = coreset_size(len(x), ratio=args.ratio)
    print(f"n: {len(x)}")
    print(f"dim: {x.shape[1]}")
    print(f"n_select: {n_select}")
    print(f"data: {data}")

    fast, fast_seconds = timed(
        "coreset", greedy_coreset, x, n_select, projection_dim=args.projection_dim, seed=args.seed
    )

    if args.reference:
        sub = x if args.reference_n is None else x[: args.reference_n]
        k = coreset_size(len(sub), ratio=args.ratio)
        if len(sub) != len(x):
            print(f"reference_n: {len(sub)}")
            fast, fast_seconds = timed(
                "coreset_subsample", greedy_coreset, sub, k, projection_dim=args.projection_dim, seed=args.seed
            )
        ref, ref_seconds = timed(
            "reference", greedy_coreset_reference, sub, k, projection_dim=args.projection_dim, seed=args.seed
        )
        print(f"speedup_vs_reference: {ref_seconds / fast_seconds:.2f}")
        print(f"identical: {str(bool(np.array_equal(fast, ref))).lower()}")


if __name__ == "__main__":
    main()
