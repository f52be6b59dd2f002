"""Two-level greedy k-center coreset of a stream of patch features: exact on small banks, linear on large ones.

The exact greedy (:func:`~patchcore.core.coreset.greedy_coreset`) over ``N`` rows costs about ``N x k`` distance
pairs for ``k = ratio x N`` centers, i.e. it grows with ``N**2``, and it needs every row (and its projection)
in memory at once. :class:`TwoLevelCoreset` keeps the exact greedy where that is cheap and otherwise composes
it (composable coresets: Malkomes et al., NeurIPS 2015; Ceccarello, Pietracaprina, Pucci, PVLDB 2019):

* While at most ``exact_rows`` rows have arrived they are only buffered; if the stream ends there,
  :meth:`TwoLevelCoreset.finish` is exactly ``greedy_coreset(all rows, k, seed=seed)``, bit for bit.
* Beyond that, the stream is cut into consecutive shards of ``shard_rows`` rows (by stream position, however
  the rows arrive). Each full shard is replaced by ``shard_keep`` of its rows, chosen by the greedy k-center rule
  (:func:`greedy_dense`, in one random projection shared by all shards, from a random start); the last,
  partial shard stays whole. ``finish`` runs the exact greedy over the union of what the shards kept.

A shard costs ``shard_rows x shard_keep x projection_dim`` multiply-adds whatever the stream's length, so the
shards cost time linear in ``N``; the final greedy costs about ``union x k``, quadratic in ``N`` but with the
union a few times ``k`` (``oversampling x ratio x N`` rows) instead of ``N``. Memory: the buffer of at most
``exact_rows`` rows until it overflows (it is freed then), one shard, and the union.

Quality: every row lies within its shard's covering radius of a kept row, which lies within the final greedy's
covering radius of a selected one, so the covering radius is at most the sum of the two (tested); measured on
textile features against the exact greedy, see ``benchmarks/streaming_coreset_bench.py --two-level``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .coreset import _as_int, _single_threaded_blas, greedy_coreset, random_projection

logger = logging.getLogger(__name__)

__all__ = ["SHARD_ROWS", "OVERSAMPLING", "EXACT_ROWS", "greedy_dense", "shard_keep", "TwoLevelCoreset"]

SHARD_ROWS = 4096  # rows per shard: each shard's greedy stays cache-resident and costs the same
OVERSAMPLING = 2.0  # a shard keeps this many times the rows its share of the final coreset needs
EXACT_ROWS = 2**19  # 524,288 rows (227 images at the 384 px defaults): the exact greedy up to here


def greedy_dense(z: Any, n_select: int, start: int) -> np.ndarray:
    """Greedy k-center selection on ``z`` ``(n, d)`` float32 rows, plain and dense: for small ``n``.

    Starts at row ``start``; repeatedly adds the row farthest from its nearest selected row. Distances are
    ``|a|^2 - 2 a.b + |b|^2`` of the rows centred on their mean, one matrix-vector product per step (cheap where
    ``z`` fits in cache; :func:`~patchcore.core.coreset.greedy_coreset` is the exact, bit-reproducible version
    for large inputs, which this one may differ from where float rounding breaks a near tie).

    Args:
        z: ``(n, d)`` float32 array, finite.
        n_select: number of rows to select, in ``[1, n]``.
        start: index of the first row, in ``[0, n)``.

    Returns:
        ``(n_select,)`` int64 distinct indices into ``z``, in selection order, ``start`` first (selected rows
        are never selected again, so duplicate rows are kept as distinct indices).

    >>> z = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [20, 0]], dtype=np.float32)
    >>> greedy_dense(z, 3, 0).tolist()
    [0, 4, 3]
    """
    z = np.asarray(z)
    if z.ndim != 2 or z.dtype != np.float32:
        raise ValueError(f"z must be a 2-D (n, d) float32 array, got shape {z.shape} and dtype {z.dtype}")
    n = z.shape[0]
    n_select, start = _as_int(n_select, "n_select"), _as_int(start, "start")
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}] (the number of rows), got {n_select}")
    if not 0 <= start < n:
        raise ValueError(f"start must be a row index in [0, {n}), got {start}")
    # Centred rows: the expanded form loses precision with |a|^2 + |b|^2, which centring keeps small.
    zc = z - z.mean(axis=0, dtype=np.float64).astype(np.float32)
    sq = np.einsum("ij,ij->i", zc, zc)
    mind = zc @ zc[start]
    mind *= -2.0
    mind += sq
    mind += sq[start]
    mind[start] = -np.inf  # never again: selected rows stay distinct even among duplicate rows
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = start
    step = np.empty_like(mind)
    for i in range(1, n_select):
        c = int(np.argmax(mind))
        selected[i] = c
        np.dot(zc, zc[c], out=step)
        step *= -2.0
        step += sq
        step += sq[c]
        np.minimum(mind, step, out=mind)
        mind[c] = -np.inf
    return selected


def shard_keep(
    ratio: float | None,
    size: int | None = None,
    *,
    exact_rows: int | None = EXACT_ROWS,
    shard_rows: int = SHARD_ROWS,
    oversampling: float = OVERSAMPLING,
) -> int:
    """Rows a full shard keeps: ``ceil(oversampling x ratio x shard_rows)``, within ``[1, shard_rows]``.

    With an absolute coreset ``size`` the ratio is ``size / exact_rows``: shards exist only when more than
    ``exact_rows`` rows arrive, so the union then holds at least ``oversampling x size`` rows.

    >>> shard_keep(0.01), shard_keep(0.5), shard_keep(None, 5243)
    (82, 4096, 82)
    """
    if size is not None:
        ratio = _as_int(size, "size") / max(1, exact_rows or 1)
    if ratio is None or not ratio > 0:
        raise ValueError(f"give a coreset ratio in (0, 1] or a size >= 1, got ratio={ratio}, size={size}")
    return int(min(shard_rows, max(1, np.ceil(oversampling * float(ratio) * shard_rows - 1e-9))))


class TwoLevelCoreset:
    """Accumulates ``(n, D)`` feature rows; :meth:`finish` returns their greedy coreset (see the module).

    The result depends only on the sequence of rows, not on how it is cut into :meth:`add` calls: shards are
    cut by stream position, and the buffered rows of the first ``exact_rows`` are reduced in the same shards
    when the buffer overflows. Every returned row is an added row (bitwise, after conversion to float32);
    ``stats["indices"]`` gives its position in the stream.

    Args:
        dim: feature dimension ``D >= 1``.
        shard_keep: rows a full shard keeps, ``>= 1`` (see :func:`shard_keep`); a shard that would keep all of
            its rows is kept whole without a greedy.
        exact_rows: up to this many rows in all, the exact greedy over all of them (``>= 0``).
        shard_rows: rows per shard, ``>= 1``.
        projection_dim: of the shards' random projection and of the final :func:`greedy_coreset`.
        seed: base seed, an int ``>= 0``: the final greedy uses it as the in-memory fit does; the shards'
            projection and starts come from a child of it.
        expected_rows: how many rows are expected (a hint that sizes the first buffer; optional).
    """

    def __init__(
        self,
        dim: int,
        shard_keep: int,
        *,
        exact_rows: int = EXACT_ROWS,
        shard_rows: int = SHARD_ROWS,
        projection_dim: int = 128,
        seed: int = 0,
        expected_rows: int | None = None,
    ) -> None:
        dim, shard_keep, exact_rows = (
            _as_int(dim, "dim"),
            _as_int(shard_keep, "shard_keep"),
            _as_int(exact_rows, "exact_rows"),
        )
        shard_rows, projection_dim = _as_int(shard_rows, "shard_rows"), _as_int(projection_dim, "projection_dim")
        seed = _as_int(seed, "seed")
        if dim < 1 or shard_rows < 1 or projection_dim < 1:
            raise ValueError(
                f"dim, shard_rows and projection_dim must be >= 1, got {dim}, {shard_rows} and {projection_dim}"
            )
        if shard_keep < 1:
            raise ValueError(f"shard_keep must be >= 1 (rows a shard keeps), got {shard_keep}")
        if exact_rows < 0 or seed < 0:
            raise ValueError(f"exact_rows and seed must be >= 0, got {exact_rows} and {seed}")
        self.dim, self.shard_keep, self.exact_rows, self.shard_rows = dim, shard_keep, exact_rows, shard_rows
        self.projection_dim, self.seed = projection_dim, seed
        # The buffer grows as rows arrive (doubling), from the expected size when it is known.
        first = 2**16 if expected_rows is None else max(1, _as_int(expected_rows, "expected_rows"))
        self._buffer = np.empty((min(exact_rows, first), dim), dtype=np.float32)
        self._fill = 0  # rows in _buffer: all rows before the overflow, the current shard's after it
        self._n_seen = 0
        self._sharded = False
        self._kept: list[np.ndarray] = []  # rows kept by the reduced shards, in stream order
        self._kept_index: list[np.ndarray] = []  # and their stream positions
        self._n_shards = 0
        self._reduce_seconds = 0.0
        # Shards share one projection and draw their starts in order: children of the seed, independent of
        # default_rng(seed), which the final greedy uses.
        self._rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 + 1,)))
        self._projection = random_projection(dim, projection_dim, self._rng)

    @property
    def n_seen(self) -> int:
        """Rows added in total."""
        return self._n_seen

    @property
    def n_kept(self) -> int:
        """Rows the final greedy would run on now: all rows before the overflow, the union after it."""
        return self._fill + sum(len(k) for k in self._kept)

    @property
    def n_shards(self) -> int:
        """Full shards reduced so far."""
        return self._n_shards

    @property
    def reduce_seconds(self) -> float:
        """Seconds spent reducing shards so far."""
        return self._reduce_seconds

    def _as_rows(self, rows: Any) -> np.ndarray:
        """A batch as a C-contiguous ``(n, D)`` float32 array (n may be 0), or a ValueError that says why not."""
        if hasattr(rows, "detach") and hasattr(rows, "numpy"):  # a torch tensor, without importing torch
            if rows.is_complex():
                raise ValueError(f"rows must be real numbers, got dtype {rows.dtype}")
            rows = rows.detach().cpu().float().numpy()
        arr = np.asarray(rows)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"rows must be a 2-D (n, {self.dim}) array, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"rows must be real numbers, got dtype {arr.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("rows contain NaN or infinite values (after conversion to float32); fix them first")
        return arr

    def add(self, rows: Any) -> None:
        """Append a batch of ``(n, D)`` rows (numpy or torch), reducing every shard that fills.

        An invalid batch raises ValueError before anything is changed.
        """
        arr = self._as_rows(rows)
        with _single_threaded_blas():  # one context per batch: entering it costs about a millisecond
            pos = 0
            while pos < arr.shape[0]:
                if not self._sharded and self._n_seen == self.exact_rows:
                    self._overflow()
                if self._sharded:
                    take = min(arr.shape[0] - pos, self.shard_rows - self._fill)
                else:
                    take = min(arr.shape[0] - pos, self.exact_rows - self._n_seen)
                    self._reserve(self._fill + take)
                self._buffer[self._fill : self._fill + take] = arr[pos : pos + take]
                self._fill += take
                self._n_seen += take
                pos += take
                if self._sharded and self._fill == self.shard_rows:
                    self._reduce(self._buffer, self._n_seen - self.shard_rows)
                    self._fill = 0

    def _reserve(self, rows: int) -> None:
        """Grow the pre-overflow buffer to hold ``rows`` rows (doubling, at most ``exact_rows``)."""
        if rows <= self._buffer.shape[0]:
            return
        grown = np.empty((min(self.exact_rows, max(rows, 2 * self._buffer.shape[0])), self.dim), dtype=np.float32)
        grown[: self._fill] = self._buffer[: self._fill]
        self._buffer = grown

    def _overflow(self) -> None:
        """More than ``exact_rows`` rows: reduce the buffered rows in shards, and keep one shard's buffer."""
        buffered, self._buffer = self._buffer, np.empty((self.shard_rows, self.dim), dtype=np.float32)
        full = self._fill - self._fill % self.shard_rows
        for a in range(0, full, self.shard_rows):
            self._reduce(buffered[a : a + self.shard_rows], a)
        self._fill -= full
        self._buffer[: self._fill] = buffered[full : full + self._fill]
        self._sharded = True
        logger.debug("two-level coreset: more than %d rows, %d shards reduced so far", self.exact_rows, self._n_shards)

    def _reduce(self, shard: np.ndarray, first: int) -> None:
        """Keep ``shard_keep`` rows of one full shard (rows at stream positions ``first`` ...), in stream order."""
        started = time.perf_counter()
        start = int(self._rng.integers(shard.shape[0]))  # drawn for every shard, so the stream decides it
        if self.shard_keep >= shard.shape[0]:
            chosen = np.arange(shard.shape[0])
        else:
            chosen = np.sort(greedy_dense(shard @ self._projection, self.shard_keep, start))
        self._kept.append(shard[chosen])
        self._kept_index.append(first + chosen)
        self._n_shards += 1
        self._reduce_seconds += time.perf_counter() - started

    def finish(self, n_select: int, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
        """The greedy coreset of ``n_select`` rows (see the module). Does not change the state.

        Returns:
            ``rows``: ``(n_select, D)`` float32, a new array, in selection order; ``stats``: ``indices``
            (``(n_select,)`` int64 stream positions of the rows), ``n_seen``, ``n_kept`` (rows the final greedy
            ran on), ``n_shards``, ``exact`` (no shard was reduced), ``reduce_seconds``, ``finish_seconds``.
        """
        n_select = _as_int(n_select, "n_select")
        if self._n_seen == 0:
            raise ValueError("no rows were added; call add() with features before finish()")
        started = time.perf_counter()
        if self._sharded:
            rows = np.concatenate([*self._kept, self._buffer[: self._fill]])
            index = np.concatenate([*self._kept_index, np.arange(self._n_seen - self._fill, self._n_seen)])
        else:
            rows, index = self._buffer[: self._fill], np.arange(self._fill)
        if not 1 <= n_select <= rows.shape[0]:
            raise ValueError(
                f"n_select={n_select} but the {'shards kept' if self._sharded else 'stream holds'} {rows.shape[0]} "
                f"of {self._n_seen} rows; lower n_select"
                + (" or let the shards keep more (shard_keep)" if self._sharded else "")
            )
        chosen = greedy_coreset(rows, n_select, projection_dim=self.projection_dim, seed=self.seed, progress=progress)
        stats = {
            "indices": index[chosen],
            "n_seen": self._n_seen,
            "n_kept": int(rows.shape[0]),
            "n_shards": self._n_shards,
            "exact": not self._sharded,
            "reduce_seconds": self._reduce_seconds,
            "finish_seconds": time.perf_counter() - started,
        }
        return rows[chosen], stats
