"""Time the exact fp32 ``knn`` against ``FilteredExactIndex`` (bf16 prefilter + exact fp32 rerank), side by side.

Usage:
    python benchmarks/knn_bench.py [--data-file BANK.npy] [--batches 1,32] [--k 1] [--repeats 5] [--threads 2]

Two shapes per image, as PatchCore predicts them:
- ``s224``: 784 queries x 152 dims against a bank of 15,680 rows (224 px, 10% coreset): the bank is a
  random 10% of the rows of ``--data-file`` (default: the real EfficientNet-Lite0 224 px blocks.2+blocks.4
  features, 156,800 x 152, chosen with ``np.random.default_rng(seed)``);
- ``s384``: 2,304 queries x 120 dims against 4,608 rows (384 px, 1% coreset): a stand-in built from the
  first 120 columns of the same real features (no real 120-dim bank is stored).
Queries are rows outside the bank, a quarter of them perturbed by Gaussian noise of half the per-dimension
std (patches unlike any in the bank). Without the file, seeded synthetic clustered features are used.

Each repeat runs knn then the filtered index on the same queries, so both see the same machine load; the
times are the best of ``--repeats`` (wall clock, seconds). Prints ``name: value`` lines per shape and batch:
``*_knn_seconds``, ``*_filtered_seconds``, ``*_speedup``, ``*_candidates_per_query`` (mean rows the
bound kept, over the filtered queries), ``*_fallback_queries``, ``*_index_mismatches`` (positions whose
index differs from knn's), ``*_tie_mismatches`` (those where the two rows' knn distances tie within fp32
rounding), ``*_max_dist_diff_rel`` (max |d_filtered - d_knn| / (|q|^2 + |b|^2), i.e. at the scale of the
fp32 rounding of knn's |q|^2 + |b|^2 - 2 q.b) and ``*_identical`` (true when every index equals knn's and
the distances agree within fp32 rounding: d within 1e-5 relative or 1e-5 (|q|^2 + |b|^2)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchcore.search import ExactIndex
from patchcore.search.bf16 import FilteredExactIndex, cpu_has_native_bf16

DEFAULT_BANK = Path("/work/exp/bank_lite0_224_b2b4.npy")
SHAPES = {  # name: (queries per image, dims, bank rows)
    "s224": (784, 152, 15_680),
    "s384": (2_304, 120, 4_608),
}


def load_rows(path: Path, seed: int) -> tuple[np.ndarray, str]:
    if path.is_file():
        return np.ascontiguousarray(np.load(path), dtype=np.float32), f"file:{path}"
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, 152), dtype=np.float32) * 3.0
    rows = centers[rng.integers(0, 64, 156_800)] + rng.standard_normal((156_800, 152), dtype=np.float32)
    return np.maximum(rows, 0.0), "synthetic_clustered"


def bank_and_queries(rows: np.ndarray, dims: int, bank_rows: int, n_queries: int, seed: int):
    rows = np.ascontiguousarray(rows[:, :dims])
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows.shape[0])
    bank = rows[np.sort(order[:bank_rows])]
    rest = order[bank_rows:]
    if rest.size < n_queries:  # more queries than rows outside the bank: reuse rows (perturbed below)
        rest = rng.choice(rest, n_queries, replace=True)
    queries = rows[rest[:n_queries]].copy()
    std = rows.std(axis=0, dtype=np.float64).astype(np.float32)
    perturbed = rng.choice(n_queries, n_queries // 4, replace=False)
    queries[perturbed] += 0.5 * std * rng.standard_normal((perturbed.size, dims), dtype=np.float32)
    return torch.from_numpy(bank), torch.from_numpy(queries)


def compare(bank, queries, exact_d, exact_i, fast_d, fast_i) -> dict:
    scale = (queries * queries).sum(1, keepdim=True) + (bank * bank).sum(1)[exact_i]
    diff = (fast_d - exact_d).abs()
    close = (diff <= 1e-5 * exact_d.abs()) | (diff <= 1e-5 * scale)
    mismatch = fast_i != exact_i
    # a mismatch is a tie when knn's own distances of the two rows agree within fp32 rounding
    if bool(mismatch.any()):
        rows = mismatch.nonzero()[:, 0]
        qm = queries[rows]
        d_other = (qm[:, None, :] - bank[fast_i[mismatch]][:, None, :]).square().sum(-1).squeeze(1)
        d_mine = (qm[:, None, :] - bank[exact_i[mismatch]][:, None, :]).square().sum(-1).squeeze(1)
        ties = int(((d_other - d_mine).abs() <= 1e-5 * scale[mismatch]).sum())
    else:
        ties = 0
    return {
        "index_mismatches": int(mismatch.sum()),
        "tie_mismatches": ties,
        "max_dist_diff_rel": float((diff / scale).max()),
        "identical": bool(not mismatch.any() and close.all()),
        "identical_up_to_ties": bool(ties == int(mismatch.sum()) and close.all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-file", type=Path, default=DEFAULT_BANK)
    parser.add_argument("--batches", default="1,32", help="images per query batch, comma separated")
    parser.add_argument("--shapes", default="s224,s384")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, source = load_rows(args.data_file, args.seed)
    print(f"data: {source}")
    print(f"torch: {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"native_bf16: {str(cpu_has_native_bf16()).lower()}")
    print(f"k: {args.k}")
    for shape in args.shapes.split(","):
        per_image, dims, bank_rows = SHAPES[shape]
        batches = [int(b) for b in args.batches.split(",")]
        bank, all_queries = bank_and_queries(rows, dims, bank_rows, per_image * max(batches), args.seed)
        exact = ExactIndex(bank)
        start = time.perf_counter()
        fast = FilteredExactIndex(bank)
        print(f"{shape}_filtered_build_seconds: {time.perf_counter() - start:.4f}")
        print(f"{shape}_filtered_active: {str(fast.filtered).lower()}")
        for batch in batches:
            queries = all_queries[: per_image * batch]
            name = f"{shape}_b{batch}"
            t_exact, t_fast = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                exact_d, exact_i = exact.search(queries, args.k)
                t_exact.append(time.perf_counter() - start)
                fast.stats = dict.fromkeys(fast.stats, 0)
                start = time.perf_counter()
                fast_d, fast_i = fast.search(queries, args.k)
                t_fast.append(time.perf_counter() - start)
            filtered = fast.stats["queries"] - fast.stats["fallback_queries"]
            print(f"{name}_queries: {queries.shape[0]}")
            print(f"{name}_knn_seconds: {min(t_exact):.4f}")
            print(f"{name}_filtered_seconds: {min(t_fast):.4f}")
            print(f"{name}_speedup: {min(t_exact) / min(t_fast):.2f}")
            print(f"{name}_candidates_per_query: {fast.stats['candidates'] / max(filtered, 1):.2f}")
            print(f"{name}_fallback_queries: {fast.stats['fallback_queries']}")
            for key, value in compare(bank, queries, exact_d, exact_i, fast_d, fast_i).items():
                value = str(value).lower() if isinstance(value, bool) else value
                print(f"{name}_{key}: {value}")


if __name__ == "__main__":
    main()
