"""Exact nearest neighbours by blocked matrix products, memory bounded by a chunk size.

The pure function under every exact search index (``patchcore.search``) and the coreset's extension step.
"""

from __future__ import annotations

import torch

# Distances held at once by default (16 MiB of fp32): blocks of this size stay near the caches, where one
# (queries x bank) matrix of hundreds of MB is page-faulted afresh on every call and grows peak memory
# with the batch (measured on a 15,680-row bank: blocks of 256-512 queries ran 1.3x faster than 8,192).
BLOCK_ELEMENTS = 1 << 22


def squared_norms(bank: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,) squared L2 norms, precomputed once per bank."""
    return (bank * bank).sum(dim=1)


def knn(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    bank_sq: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows of each query.

    queries (Q, D), bank (M, D) -> (squared L2 distances (Q, k) ascending, indices (Q, k) int64).
    Distances use |q|^2 - 2 q.b + |b|^2 (one GEMM per chunk), clamped at 0. At most ``chunk_size`` x M
    distances exist at once (None: on a CPU as many queries as keep that near ``BLOCK_ELEMENTS``, at least
    16; elsewhere 8192), so memory stays bounded for any number of queries. Results are written into
    preallocated buffers, so it is not differentiable.

    >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    >>> dists, idx = knn(torch.tensor([[3.0, 3.0], [0.0, 0.5]]), bank, k=2)
    >>> dists
    tensor([[1.0000, 8.0000],
            [0.2500, 1.2500]])
    >>> idx
    tensor([[1, 2],
            [0, 2]])
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"knn needs (Q, D) queries and (M, D) bank; got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must lie between 1 and the bank size {bank.shape[0]}")
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    if chunk_size is None:  # a GPU wants few big launches; a CPU wants cache-sized blocks
        chunk_size = max(16, BLOCK_ELEMENTS // bank.shape[0]) if queries.device.type == "cpu" else 8192
    n = queries.shape[0]
    chunk_size = max(1, min(chunk_size, n))
    # Every buffer is allocated once, before the loop: a fresh (chunk, M) matrix per chunk with small
    # results kept in between fragments glibc's heap, which then grows by about one matrix per chunk.
    dists = torch.empty(n, k, dtype=queries.dtype, device=queries.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=queries.device)
    buffer = torch.empty(chunk_size, bank.shape[0], dtype=queries.dtype, device=queries.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        q, d = queries[start:stop], buffer[: stop - start]
        # |b|^2 - 2 q.b ranks the bank like the full distance; |q|^2 is added to the k winners only,
        # which saves two passes over the (chunk, M) matrix.
        torch.addmm(bank_sq[None, :], q, bank.T, alpha=-2.0, out=d)
        value, index = dists[start:stop], indices[start:stop]
        if k == 1:
            torch.min(d, dim=1, keepdim=True, out=(value, index))
        else:
            torch.topk(d, k, dim=1, largest=False, sorted=True, out=(value, index))
        value.add_((q * q).sum(dim=1, keepdim=True)).clamp_(min=0.0)
    return dists, indices
