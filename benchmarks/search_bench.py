"""Time exact ``knn`` (torch GEMM) against the faiss backend (flat / ivf / hnsw), and measure the drift.

Usage:
    python benchmarks/search_bench.py [--data-file BANK.npy] [--bank-fraction 0.1] [--threads 2]
        [--batches 784,25088] [--ivf-nprobe 8,32] [--hnsw-ef 64,128] [--repeats 3] [--textile]

The memory bank is a random ``--bank-fraction`` of the rows of ``--data-file`` (default: the real
EfficientNet-Lite0 224 px blocks.2+blocks.4 features, 156,800 x 152; chosen with
``np.random.default_rng(seed)``), standing in for the 10% coreset. Queries are rows outside the bank
(nominal patches) plus a quarter of them perturbed by Gaussian noise of half the per-dimension std
(patches unlike any in the bank). Without the file, a seeded synthetic clustered bank is used.

Times (``*_seconds``, median of ``--repeats``, wall clock) for query batches of 784 (one 224 px image,
28 x 28 patches) and 32 x 784. Build times once per index. For each faiss index, on the largest batch,
against the exact ``knn``:
- ``recall_at_1``: share of queries whose nearest row is the exact one (or ties its distance);
- ``score_drift_rel_max`` / ``_mean``: (s_approx - s_exact) / s_exact with s = sqrt(nearest squared
  distance), i.e. the patch score of ``paper`` mode (for the squared distance of ``official`` mode the
  drift is about twice that);
- ``image_score_drift_rel_max`` / ``_mean``: the same for image scores (max patch score of each 784 block).
``--textile`` (optional, a few minutes on 2 cores) also fits ``PatchCore`` on the textile protocol
(EfficientNet-Lite0, 224 px, blocks.2 + blocks.4, greedy 10% coreset), extracts the 600 test images'
patch features, and reports the image AUROC with the image score = max patch L2 distance (eq. 7 off)
computed by the exact search and by each faiss index (``textile_auroc_*``, ``*_delta``).
Prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchcore.core.knn import knn, squared_norms
from patchcore.search.faiss_index import FaissIndex

DEFAULT_BANK = Path("/work/exp/bank_lite0_224_b2b4.npy")
PATCHES_PER_IMAGE = 28 * 28


def load_rows(path: Path, seed: int) -> tuple[np.ndarray, str]:
    if path.is_file():
        return np.ascontiguousarray(np.load(path), dtype=np.float32), f"file:{path}"
    from coreset_bench import make_features  # synthetic clustered features, same generator as there

    return make_features(156_800, 152, "clustered", seed), "synthetic_clustered"


def make_bank_and_queries(rows: np.ndarray, fraction: float, n_queries: int, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows.shape[0])
    m = max(1, round(fraction * rows.shape[0]))
    bank = rows[np.sort(order[:m])]
    rest = order[m:]
    if rest.size < n_queries:
        raise SystemExit(f"only {rest.size} rows outside the bank; need {n_queries} queries")
    queries = rows[rest[:n_queries]].copy()
    n_perturbed = n_queries // 4
    std = rows.std(axis=0, dtype=np.float64).astype(np.float32)
    perturbed = rng.choice(n_queries, n_perturbed, replace=False)
    queries[perturbed] += 0.5 * std * rng.standard_normal((n_perturbed, rows.shape[1]), dtype=np.float32)
    return bank, queries


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def drift(approx_d: torch.Tensor, approx_i: torch.Tensor, exact_d: torch.Tensor, exact_i: torch.Tensor) -> dict:
    a, e = approx_d[:, 0].double(), exact_d[:, 0].double()
    hit = (approx_i[:, 0] == exact_i[:, 0]) | (a <= e * (1 + 1e-5) + 1e-6)
    sa, se = a.sqrt(), e.sqrt()
    keep = se > 0
    rel = (sa[keep] - se[keep]).abs() / se[keep]
    n_img = sa.numel() // PATCHES_PER_IMAGE
    ia = sa[: n_img * PATCHES_PER_IMAGE].reshape(n_img, -1).amax(1)
    ie = se[: n_img * PATCHES_PER_IMAGE].reshape(n_img, -1).amax(1)
    irel = (ia - ie).abs() / ie.clamp_min(1e-12)
    return {
        "recall_at_1": hit.double().mean().item(),
        "score_drift_rel_max": rel.max().item(),
        "score_drift_rel_mean": rel.mean().item(),
        "sq_dist_drift_rel_max": ((a - e).abs()[keep] / e[keep]).max().item(),
        "image_score_drift_rel_max": irel.max().item(),
        "image_score_drift_rel_mean": irel.mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-file", type=Path, default=DEFAULT_BANK)
    parser.add_argument("--bank-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--batches", default=f"{PATCHES_PER_IMAGE},{32 * PATCHES_PER_IMAGE}")
    parser.add_argument("--ivf-nprobe", default="8,32", help="comma list; one ivf index per value")
    parser.add_argument("--nlist", type=int, default=None, help="ivf cells (default: search_faiss.default_nlist)")
    parser.add_argument("--hnsw-ef", default="64,128", help="comma list of ef_search values")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--textile", action="store_true", help="also the AUROC change on the textile protocol")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows, source = load_rows(args.data_file, args.seed)
    bank_np, queries_np = make_bank_and_queries(rows, args.bank_fraction, max(batches), args.seed)
    del rows
    bank, queries = torch.from_numpy(bank_np), torch.from_numpy(queries_np)
    print(f"data: {source}")
    print(f"bank_rows: {bank.shape[0]}")
    print(f"dim: {bank.shape[1]}")
    print(f"queries: {queries.shape[0]} (a quarter perturbed)")
    print(f"threads: {args.threads}", flush=True)

    bank_sq = squared_norms(bank)
    exact, exact_seconds = {}, {}
    for b in batches:
        exact_seconds[b], exact[b] = median_time(
            lambda b=b: knn(queries[:b], bank, 1, bank_sq=bank_sq, chunk_size=args.chunk_size), args.repeats
        )
        print(f"exact_knn_q{b}_seconds: {exact_seconds[b]:.4f}", flush=True)
    ref_d, ref_i = exact[max(batches)]

    configs = [("flat", "flat", {})]
    configs += [(f"ivf_np{p}", "ivf", {"nprobe": int(p), "nlist": args.nlist}) for p in args.ivf_nprobe.split(",") if p]
    configs += [
        (f"hnsw_ef{e}", "hnsw", {"ef_search": int(e), "hnsw_m": args.hnsw_m}) for e in args.hnsw_ef.split(",") if e
    ]
    built: dict[tuple, FaissIndex] = {}
    for name, kind, options in configs:
        # ivf / hnsw indexes differing only in a search-time knob share one build
        build_key = (kind, options.get("nlist"), options.get("hnsw_m"))
        if build_key not in built:
            start = time.perf_counter()
            built[build_key] = FaissIndex(bank, kind, threads=args.threads, seed=args.seed, **options)
            print(f"faiss_{kind}_build_seconds: {time.perf_counter() - start:.3f}", flush=True)
        index = built[build_key]
        if kind == "ivf":
            index.nprobe = index.index.nprobe = min(options["nprobe"], index.nlist)
            print(f"faiss_{name}_nlist: {index.nlist}")
        elif kind == "hnsw":
            index.ef_search = index.index.hnsw.efSearch = options["ef_search"]
        for b in batches:
            t, result = median_time(lambda b=b, index=index: index.search(queries[:b], 1), args.repeats)
            print(f"faiss_{name}_q{b}_seconds: {t:.4f}")
            print(f"faiss_{name}_q{b}_speedup_vs_exact: {exact_seconds[b] / t:.2f}")
        for key, value in drift(*result, ref_d, ref_i).items():
            print(f"faiss_{name}_{key}: {value:.6g}", flush=True)
    if args.textile:
        textile_auroc(configs, args)


def textile_auroc(configs, args) -> None:
    """Image AUROC on the textile protocol, exact search vs each faiss index over the fitted bank."""
    from patchcore import PatchCore
    from patchcore.datasets import textile
    from patchcore.evaluation.metrics import auroc

    data = textile()
    start = time.perf_counter()
    model = PatchCore(
        resize=224, layers=("blocks.2", "blocks.4"), global_branch=False, coarse_branch=False, seed=args.seed
    ).fit(data.train)
    test = model.extract_features([s.path for s in data.test])
    print(f"textile_fit_and_extract_seconds: {time.perf_counter() - start:.1f}", flush=True)
    labels = np.array([s.label for s in data.test])
    bank = model.memory_bank_
    n_img, per_img = test.shape[0], test.shape[1] * test.shape[2]
    queries = torch.from_numpy(test.reshape(n_img * per_img, -1))
    print(f"textile_bank_rows: {bank.shape[0]}")

    def image_scores(d: torch.Tensor) -> np.ndarray:
        return d[:, 0].sqrt().reshape(n_img, per_img).amax(1).double().numpy()

    start = time.perf_counter()
    exact_d, _ = knn(queries, bank, 1, bank_sq=squared_norms(bank), chunk_size=args.chunk_size)
    print(f"textile_exact_knn_seconds: {time.perf_counter() - start:.2f}")
    exact_scores = image_scores(exact_d)
    exact_auroc = auroc(labels, exact_scores)
    print(f"textile_auroc_exact: {exact_auroc:.6f}", flush=True)
    for name, kind, options in configs:
        index = FaissIndex(bank, kind, threads=args.threads, seed=args.seed, **options)
        start = time.perf_counter()
        d, _ = index.search(queries, 1)
        print(f"textile_faiss_{name}_seconds: {time.perf_counter() - start:.2f}")
        scores = image_scores(d)
        value = auroc(labels, scores)
        print(f"textile_auroc_faiss_{name}: {value:.6f}")
        print(f"textile_auroc_faiss_{name}_delta: {value - exact_auroc:+.6f}")
        rel = np.abs(scores - exact_scores) / exact_scores
        print(f"textile_faiss_{name}_image_score_drift_rel_max: {rel.max():.3g}", flush=True)


if __name__ == "__main__":
    main()
