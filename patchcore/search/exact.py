"""The plain exact index: the blocked fp32 GEMM of :func:`patchcore.core.knn.knn` over a fixed bank."""

from __future__ import annotations

import torch

from ..core.knn import knn, squared_norms


class ExactIndex:
    """Exact search over a fixed (M, D) bank, its squared norms computed once; the contract of every index.

    >>> index = ExactIndex(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> index.search(torch.tensor([[3.0, 3.0]]))
    (tensor([[1.]]), tensor([[1]]))
    """

    def __init__(self, bank: torch.Tensor, chunk_size: int | None = None) -> None:
        self.bank = bank
        self.bank_sq = squared_norms(bank)
        self.chunk_size = chunk_size

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> (squared L2 distances (Q, k) ascending, indices (Q, k))."""
        return knn(queries, self.bank, k, bank_sq=self.bank_sq, chunk_size=self.chunk_size)
