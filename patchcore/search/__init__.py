"""Nearest-neighbour indexes over a memory bank, chosen by name at run time (``--search``).

Every index takes a ``(M, D)`` float32 bank and answers ``search(queries (Q, D), k)`` with
``(squared L2 distances (Q, k) ascending, indices (Q, k) int64)``. :data:`BACKENDS` is the one place to
add a backend: a name and a factory ``(bank, chunk_size, seed) -> index``.

``exact`` (the default): a bf16 matrix product with a rigorous error bound shortlists a few rows per
query, which are ranked in fp32: the answers of the fp32 search, 2-3x faster on CPUs with native bf16
dot products (see ``bf16.py`` and benchmarks/knn_bench.py); elsewhere it is the fp32 search.
``exact-fp32``: the plain blocked fp32 GEMM. ``faiss-*``: a faiss index (``pip install 'patchcore[faiss]'``);
the approximate kinds (ivf, hnsw) trade a small score drift for speed: see benchmarks/search_bench.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .bf16 import FilteredExactIndex
    from .exact import ExactIndex

# The indexes (and torch) load when one is built: the command line lists the backends without torch.
_LAZY = {"FilteredExactIndex": ".bf16", "ExactIndex": ".exact"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def _exact(bank: torch.Tensor, chunk_size: int | None, seed: int) -> Any:
    from .bf16 import FilteredExactIndex

    return FilteredExactIndex(bank, chunk_size)


def _exact_fp32(bank: torch.Tensor, chunk_size: int | None, seed: int) -> Any:
    from .exact import ExactIndex

    return ExactIndex(bank, chunk_size)


def _faiss(kind: str) -> Callable[[torch.Tensor, int | None, int], Any]:
    def build(bank: torch.Tensor, chunk_size: int | None, seed: int) -> Any:
        from .faiss_index import FaissIndex  # faiss itself is imported only when an index is built

        return FaissIndex(bank, kind, seed=seed)

    return build


BACKENDS: dict[str, Callable[[torch.Tensor, int | None, int], Any]] = {
    "exact": _exact,
    "exact-fp32": _exact_fp32,
    "faiss-flat": _faiss("flat"),
    "faiss-ivf": _faiss("ivf"),
    "faiss-hnsw": _faiss("hnsw"),
}
SEARCH_BACKENDS = tuple(BACKENDS)


def build_index(bank: torch.Tensor, backend: str = "exact", chunk_size: int | None = None, seed: int = 0) -> Any:
    """An index over ``bank`` (M, D) by backend name (see :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"search backend {backend!r} is not one of {', '.join(SEARCH_BACKENDS)}")
    return BACKENDS[backend](bank, chunk_size, seed)


__all__ = ["BACKENDS", "SEARCH_BACKENDS", "ExactIndex", "FilteredExactIndex", "build_index"]
