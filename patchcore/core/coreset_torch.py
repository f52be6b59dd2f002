"""The greedy k-center coreset (PatchCore Algorithm 1) in torch, on whatever device holds the bank.

On a CPU, :func:`patchcore.core.coreset.greedy_coreset` (numpy) is the fast one: it skips most distance
computations with lazy bounds. On a GPU the paper's plain loop is: each step is a few passes over the
projected bank at memory bandwidth, and the chosen row never goes back to the host (no synchronisation
per step), so a bank extracted on the GPU is reduced there instead of being copied to the CPU.

It draws from the random generator exactly as the numpy versions do (the projection matrix first, then
the start row) and computes float32 squared distances in the same difference form with the same rule on
ties (the first index of the maximum), so it selects what
:func:`patchcore.core.coreset.greedy_coreset_reference` selects, up to the rounding of the projection
and of the distances (a device sums in another order, which can break a near-tie the other way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from .coreset import random_projection

logger = logging.getLogger(__name__)

# Elements of the (rows, d) difference block held at once: 256 MiB of float32.
BLOCK_ELEMENTS = 1 << 26
PROGRESS_EVERY = 1024  # steps between progress callbacks (each one waits for the device)


def greedy_coreset_torch(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int = 128,
    seed: int | np.random.Generator = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Greedy k-center coreset of ``features`` (N, D) on their device: ``(n_select,)`` int64 indices in
    selection order, the first one the random start (see the module docstring for how it relates to
    :func:`patchcore.core.coreset.greedy_coreset`).

    >>> points = torch.tensor([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [20, 0]])
    >>> sorted(int(i) // 2 for i in greedy_coreset_torch(points, 3, projection_dim=2, seed=0))
    [0, 1, 2]
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or min(features.shape) < 1:
        raise ValueError("features must be a non-empty (N, D) torch tensor; flatten patch features first")
    n, dim = features.shape
    if isinstance(n_select, bool) or not isinstance(n_select, (int, np.integer)) or not 1 <= n_select <= n:
        raise ValueError(f"n_select must be a whole number in [1, {n}] (the number of features), got {n_select!r}")
    started = time.perf_counter()
    x = features.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or infinite values; remove or fix those rows before the coreset")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    projection = torch.from_numpy(random_projection(dim, projection_dim, rng)).to(x.device)
    with torch.inference_mode():
        z = x @ projection
        start = int(rng.integers(n))
        step = max(1, BLOCK_ELEMENTS // z.shape[1])
        mind = _squared_distances(z, z[start : start + 1], step)
        if not bool(torch.isfinite(mind).all()):
            raise ValueError("projected features are too large for float32 distances; rescale the features")
        selected = torch.empty(int(n_select), dtype=torch.int64, device=z.device)
        selected[0] = start
        for i in range(1, int(n_select)):
            c = torch.argmax(mind)  # stays on the device: no host round trip per step
            selected[i] = c
            torch.minimum(mind, _squared_distances(z, z.index_select(0, c.view(1)), step), out=mind)
            if progress is not None and i % PROGRESS_EVERY == 0:
                progress(i + 1)
        chosen = selected.cpu().numpy()
    if progress is not None:
        progress(int(n_select))
    logger.debug("greedy coreset on %s: %d of %d rows in %.2fs", z.device, n_select, n, time.perf_counter() - started)
    return chosen


def _squared_distances(z: torch.Tensor, center: torch.Tensor, step: int) -> torch.Tensor:
    """(N, d) rows, (1, d) center -> (N,) float32 squared distances in the difference form, ``step`` rows at
    a time (each row's value depends on that row alone)."""
    if z.shape[0] <= step:
        return (z - center).square_().sum(dim=1)
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    for a in range(0, z.shape[0], step):
        out[a : a + step] = (z[a : a + step] - center).square_().sum(dim=1)
    return out
