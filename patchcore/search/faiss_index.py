"""Optional faiss nearest-neighbour backend with the same contract as :func:`patchcore.search.knn`.

``FaissIndex(bank, kind)`` builds an index once over a ``(M, D)`` bank; ``index.search(queries, k)`` then
returns ``(squared L2 distances (Q, k) float32 ascending, indices (Q, k) int64)`` like ``knn``, on the
queries' device. Kinds:

- ``flat``: ``IndexFlatL2``, exact (the same answers as ``knn`` up to float rounding and ties);
- ``ivf``: ``IndexIVFFlat``, ``nlist`` k-means cells (default ``round(4 * sqrt(M))``, at most ``M // 39``)
  trained on the bank itself with ``seed``; a query visits ``nprobe`` cells; ``nprobe = nlist`` is exact;
- ``hnsw``: ``IndexHNSWFlat`` with ``hnsw_m`` links per node, ``ef_search`` candidates at query time;
  built on one thread with its level generator seeded by ``seed``, so the graph is reproducible.

Approximate kinds return distances >= the exact ones (they are true distances to the rows they found).
A query the approximate index answers with fewer than ``k`` rows (faiss pads with -1) is answered by the
exact ``knn`` instead, so every index returned is valid.

faiss is imported lazily: this module imports without it, and building an index without it raises
:class:`~patchcore.errors.PatchCoreError` naming the install command.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from ..core.knn import knn, squared_norms
from ..errors import PatchCoreError

INDEX_KINDS = ("flat", "ivf", "hnsw")

_MISSING = "the faiss search backend needs: pip install 'patchcore[faiss]'"


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise PatchCoreError(_MISSING) from error
    return faiss


@contextlib.contextmanager
def _omp_threads(faiss, threads: int | None) -> Iterator[None]:
    """Run the block with faiss's OpenMP pool at ``threads`` (unchanged for None), then restore it."""
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_float32_rows(array, name: str) -> np.ndarray:
    """torch tensor or array-like -> C-contiguous float32 (N, D) numpy array on the CPU."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {array.shape}")
    return array


def default_nlist(m: int) -> int:
    """Number of IVF cells for a bank of ``m`` rows: about 4 sqrt(m), at most m / 39, at least 1.

    faiss's k-means wants 39 training rows per cell (it warns below that), and the bank is the training set.
    """
    return max(1, min(round(4 * math.sqrt(m)), m // 39))


class FaissIndex:
    """Nearest-neighbour index over a (M, D) float32 bank with the same contract as search.knn."""

    def __init__(
        self,
        bank: torch.Tensor | np.ndarray,
        kind: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown faiss index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        rows = _as_float32_rows(bank, "bank")
        m, d = rows.shape
        if m < 1 or d < 1:
            raise ValueError(f"the bank must have at least one row and one column; got shape {rows.shape}")
        if not np.isfinite(rows).all():
            raise ValueError("the bank holds NaN or infinite values")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} must be at least 1 (or None for faiss's default)")
        faiss = _import_faiss()
        self.kind = kind
        self.threads = threads
        self.seed = seed
        self.dim = d
        self.size = m
        # The exact search answers the queries an approximate index leaves short of k results.
        self.bank = torch.from_numpy(rows)  # kept for exact fall-backs and eq. 7's neighbour rows
        self._bank_sq: torch.Tensor | None = None
        self.nlist = self.nprobe = self.hnsw_m = self.ef_search = None
        with _omp_threads(faiss, threads):
            if kind == "flat":
                index = faiss.IndexFlatL2(d)
                index.add(rows)
            elif kind == "ivf":
                nlist = default_nlist(m) if nlist is None else nlist
                if not 1 <= nlist <= m:
                    raise ValueError(f"nlist={nlist} must lie between 1 and the bank size {m}")
                if nprobe < 1:
                    raise ValueError(f"nprobe={nprobe} must be at least 1")
                self.nlist, self.nprobe = nlist, min(nprobe, nlist)
                quantizer = faiss.IndexFlatL2(d)
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
                index.cp.seed = seed  # k-means initialisation and subsampling: reproducible cells
                index.cp.verbose = False
                index.train(rows)
                index.add(rows)
                index.nprobe = self.nprobe
                self._quantizer = quantizer  # keep the Python object alive while the index uses it
            else:
                if hnsw_m < 2:
                    raise ValueError(f"hnsw_m={hnsw_m} must be at least 2")
                if ef_search < 1:
                    raise ValueError(f"ef_search={ef_search} must be at least 1")
                self.hnsw_m, self.ef_search = hnsw_m, ef_search
                index = faiss.IndexHNSWFlat(d, hnsw_m)
                index.hnsw.rng = faiss.RandomGenerator(seed)  # node levels
                index.hnsw.efSearch = ef_search
                # Parallel insertion links nodes in a schedule-dependent order: build on one thread.
                with _omp_threads(faiss, 1):
                    index.add(rows)
        self._faiss = faiss
        self.index = index

    def __repr__(self) -> str:
        extra = {
            "ivf": f", nlist={self.nlist}, nprobe={self.nprobe}",
            "hnsw": f", hnsw_m={self.hnsw_m}, ef_search={self.ef_search}",
        }.get(self.kind, "")
        return f"FaissIndex(kind={self.kind!r}, size={self.size}, dim={self.dim}{extra})"

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (squared L2 distances (Q, k) float32 ascending, indices (Q, k) int64).

        Results lie on the queries' device (a numpy array gives CPU tensors), like ``knn``'s.
        """
        if isinstance(queries, torch.Tensor):
            device = queries.device
            shape = tuple(queries.shape)
        else:
            device = torch.device("cpu")
            shape = np.shape(queries)
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"search needs (Q, {self.dim}) queries for a bank of dimension {self.dim}; got {shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.size:
            raise ValueError(f"k={k} must lie between 1 and the bank size {self.size}")
        k = int(k)
        rows = _as_float32_rows(queries, "queries")
        if rows.shape[0] == 0:
            return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.int64, device=device)
        with _omp_threads(self._faiss, self.threads):
            dists, indices = self.index.search(rows, k)
        missing = (indices < 0).any(axis=1)
        if missing.any():
            if self._bank_sq is None:
                self._bank_sq = squared_norms(self.bank)
            exact_d, exact_i = knn(torch.from_numpy(rows[missing]), self.bank, k, bank_sq=self._bank_sq)
            dists[missing], indices[missing] = exact_d.numpy(), exact_i.numpy()
        np.maximum(dists, 0.0, out=dists)
        dists_t = torch.from_numpy(dists)
        indices_t = torch.from_numpy(indices.astype(np.int64, copy=False))
        return dists_t.to(device), indices_t.to(device)
