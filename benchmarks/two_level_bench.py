"""The two-level greedy coreset (the default for banks over ``exact_coreset_rows``) against the exact greedy.

Usage:
    python benchmarks/two_level_bench.py [--images 250 1000] [--bank FILE.npy] [--save-bank FILE.npy]
        [--exact-rows N] [--skip-exact]

Real patch features: the defaults' (EfficientNet-Lite0 at 384 px, 2,304 rows per image: 40 dimensions of
blocks.2 since 2026-12-02, 120 of blocks.2 + blocks.3 before) of the first N textile nominal images, extracted
once for the largest N (or read from ``--bank``, a ``(rows, D)`` float32 .npy such as one written by
``--save-bank``). For each N, at the default
1% coreset, seed 0, one BLAS thread for both selections (as fit runs them), prints ``name: value`` lines:

* ``seconds_exact_nN``: ``greedy_coreset`` over the whole bank (what ``exact_coreset_rows=None`` does);
* ``seconds_two_level_nN``: ``TwoLevelCoreset`` fed the bank in 32-image batches, as fit feeds it, of which
  ``seconds_shards_nN`` reducing shards and ``seconds_final_nN`` the exact greedy over their union
  (``union_nN`` rows);
* ``covering_radius_exact_nN``, ``covering_radius_two_level_nN``: the largest distance of any of the N x 2,304
  rows to its nearest selected row (original feature space), and ``radius_ratio_nN`` = two-level / exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming_coreset_bench import covering_radius

from patchcore.core import two_level
from patchcore.core.coreset import coreset_size, greedy_coreset

ROWS_PER_IMAGE = 48 * 48  # the defaults' feature grid at 384 px (stride 8)


def textile_bank(n_images: int) -> np.ndarray:
    """``(n_images * 2304, D)`` float32 patch features of the first textile nominal images, at the defaults."""
    import conformal_clip_data as ccd

    from patchcore import PatchCore

    folder = ccd.nominal_dir()
    paths = sorted(str(Path(folder) / f) for f in os.listdir(folder) if f.lower().endswith((".jpg", ".png")))
    model = PatchCore(seed=0, batch_size=32)
    backbone = model._make_backbone()
    bank = np.concatenate([batch.rows.numpy() for batch in model._features(paths[:n_images], backbone, "features")])
    assert len(bank) == n_images * ROWS_PER_IMAGE, (len(bank), n_images)
    return bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[250, 1000], help="training set sizes")
    ap.add_argument("--bank", help="read the features from this .npy instead of extracting them")
    ap.add_argument("--save-bank", help="write the extracted features to this .npy")
    ap.add_argument(
        "--exact-rows", type=int, default=two_level.EXACT_ROWS, help="0 forces the two-level greedy at any size"
    )
    ap.add_argument("--skip-exact", action="store_true", help="two-level only (no exact greedy, no radius ratio)")
    ap.add_argument(
        "--oversampling",
        type=float,
        default=two_level.OVERSAMPLING,
        help=f"rows a shard keeps, as a multiple of its share of the coreset (default {two_level.OVERSAMPLING})",
    )
    ap.add_argument(
        "--shard-rows", type=int, default=two_level.SHARD_ROWS, help=f"rows per shard (default {two_level.SHARD_ROWS})"
    )
    args = ap.parse_args()

    n_max = max(args.images)
    if args.bank:
        bank = np.load(args.bank, mmap_mode="r")[: n_max * ROWS_PER_IMAGE]
        bank = np.ascontiguousarray(bank, dtype=np.float32)
    else:
        started = time.perf_counter()
        bank = textile_bank(n_max)
        print(f"seconds_features_n{n_max}: {time.perf_counter() - started:.2f}", flush=True)
        if args.save_bank:
            np.save(args.save_bank, bank)
    print(f"exact_rows: {args.exact_rows}")
    print(f"shard_rows: {args.shard_rows}")
    print(f"oversampling: {args.oversampling}", flush=True)
    for n_images in sorted(args.images):
        x = bank[: n_images * ROWS_PER_IMAGE]
        k = coreset_size(len(x), 0.01)
        tag = f"n{n_images}"
        print(f"rows_{tag}: {len(x)}")
        print(f"coreset_{tag}: {k}", flush=True)

        started = time.perf_counter()
        stream = two_level.TwoLevelCoreset(
            x.shape[1],
            two_level.shard_keep(
                0.01, oversampling=args.oversampling, exact_rows=args.exact_rows, shard_rows=args.shard_rows
            ),
            exact_rows=args.exact_rows,
            shard_rows=args.shard_rows,
            seed=0,
        )
        batch = 32 * ROWS_PER_IMAGE
        for a in range(0, len(x), batch):
            stream.add(x[a : a + batch])
        rows, info = stream.finish(k)
        print(f"seconds_two_level_{tag}: {time.perf_counter() - started:.2f}")
        print(f"seconds_shards_{tag}: {info['reduce_seconds']:.2f}")
        print(f"seconds_final_{tag}: {info['finish_seconds']:.2f}")
        print(f"union_{tag}: {info['n_kept']}", flush=True)
        r_two = covering_radius(x, rows)
        print(f"covering_radius_two_level_{tag}: {r_two:.6g}", flush=True)
        if args.skip_exact:
            continue
        started = time.perf_counter()
        exact = greedy_coreset(x, k, seed=0)
        print(f"seconds_exact_{tag}: {time.perf_counter() - started:.2f}", flush=True)
        r_exact = covering_radius(x, x[exact])
        print(f"covering_radius_exact_{tag}: {r_exact:.6g}")
        print(f"radius_ratio_{tag}: {r_two / r_exact:.4f}", flush=True)


if __name__ == "__main__":
    main()
