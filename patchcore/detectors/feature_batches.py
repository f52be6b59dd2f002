"""Batches of model inputs of mixed shapes: the backbone runs once per shape, all that follows once per batch.

With ``keep_aspect`` and no crop every image has its own shape, and tiles of different images can differ
too. Stacking needs one shape, so batches used to end at every change of shape, and the search, scoring
and maps then ran on one image at a time. Here a batch takes up to ``batch_size`` consecutive inputs of
any shapes (and at most the pixels of ``batch_size`` square inputs, so its memory stays what a square
batch needs); the backbone runs once per group of equal shapes, and the patch features of all inputs are
concatenated into one ``(P, D)`` block, input after input: one search call for the whole batch, whose
answers are split back per input. Every input's rows are searched and scored exactly as they would be
alone, so scores do not depend on how inputs are grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..core.maps import anomaly_maps
from ..imaging import Geometry, TiledGeometry

#: (geometry of the input's image, whether the input is its image's last): one per model input.
Owner = tuple[Geometry | TiledGeometry, bool]
T = TypeVar("T")


@dataclass(frozen=True)
class FeatureBatch:
    """Patch features of a batch of model inputs of any shapes.

    ``rows`` (P, D): the h_i * w_i rows of input i (its feature grid, row-major) follow those of inputs
    0 .. i-1; ``grids``: (h_i, w_i) per input; ``input_shapes``: (H_i, W_i) per input (the model input's
    size, which is its anomaly map's); ``owners``: per input, its image's geometry and whether it is its
    image's last input (tiles).
    """

    rows: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    input_shapes: tuple[tuple[int, int], ...]
    owners: tuple[Owner, ...]

    def __len__(self) -> int:
        return len(self.grids)

    @property
    def bounds(self) -> list[int]:
        """(n + 1,) row offsets: input i holds rows ``bounds[i]:bounds[i + 1]``."""
        return [0, *np.cumsum([h * w for h, w in self.grids]).tolist()]

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(P, ...) values, one per row -> per input its (h_i * w_i, ...) slice (views, no copies)."""
        if values.shape[0] != self.bounds[-1]:
            raise ValueError(f"{values.shape[0]} values for a batch of {self.bounds[-1]} rows")
        return list(torch.split(values, [h * w for h, w in self.grids]))


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Positions of equal shapes, grouped; groups in order of first appearance, positions ascending.

    >>> group_by_shape([(2, 3), (4, 4), (2, 3), (5, 1)])
    [[0, 2], [1], [3]]
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return list(groups.values())


def take_batches(items: Iterable[T], size: Callable[[T], int], max_items: int, max_size: int) -> Iterator[list[T]]:
    """Consecutive ``items`` in batches of at most ``max_items`` items whose ``size`` adds up to at most
    ``max_size`` (a single item larger than that makes a batch of its own), lazily, in order.

    >>> [len(b) for b in take_batches(range(7), lambda i: 1 + (i == 3) * 9, max_items=3, max_size=5)]
    [3, 1, 3]
    """
    if max_items < 1:
        raise ValueError(f"max_items={max_items} must be at least 1")
    batch: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if batch and (len(batch) == max_items or total + n > max_size):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch


def extract_batch(
    inputs: Sequence[torch.Tensor], owners: Sequence[Owner], extract: Callable[[torch.Tensor], torch.Tensor]
) -> FeatureBatch:
    """Model inputs (3, H_i, W_i) of any shapes -> their :class:`FeatureBatch`.

    ``extract`` maps a (B, 3, H, W) stack of equal shapes to its (B, h, w, D) patch features; it is called
    once per group of equal shapes. When all inputs share one shape the rows are a view of its output.
    """
    if not inputs or len(inputs) != len(owners):
        raise ValueError(f"{len(inputs)} inputs for {len(owners)} owners: a batch needs one owner per input")
    shapes = [tuple(x.shape) for x in inputs]
    groups = group_by_shape(shapes)
    per_input: list[torch.Tensor | None] = [None] * len(inputs)
    for group in groups:
        feats = extract(torch.stack([inputs[i] for i in group]) if len(group) > 1 else inputs[group[0]][None])
        for j, i in enumerate(group):
            per_input[i] = feats[j]
    done = [f for f in per_input if f is not None]
    grids = tuple((int(f.shape[0]), int(f.shape[1])) for f in done)
    dim = int(feats.shape[-1])
    if len(groups) == 1:  # one shape: the extractor's output in input order already, no copy
        rows = feats.reshape(-1, dim)
    else:
        rows = torch.cat([f.reshape(-1, dim) for f in done])
    return FeatureBatch(rows, grids, tuple((s[1], s[2]) for s in shapes), tuple(owners))


def batch_maps(scores: torch.Tensor, batch: FeatureBatch, sigma: float) -> list[np.ndarray]:
    """(P,) patch scores of a batch -> per input its (H_i, W_i) float32 anomaly map at input resolution.

    :func:`patchcore.core.maps.anomaly_maps` runs once per group of inputs sharing grid and input shape.
    """
    parts = batch.split(scores)
    keys = [(*grid, *shape) for grid, shape in zip(batch.grids, batch.input_shapes)]
    out: list[np.ndarray | None] = [None] * len(batch)
    for group in group_by_shape(keys):
        h, w = batch.grids[group[0]]
        grid_scores = torch.stack([parts[i].view(h, w) for i in group])
        maps = anomaly_maps(grid_scores, batch.input_shapes[group[0]], sigma).cpu().numpy()
        for j, i in enumerate(group):
            out[i] = maps[j]
    return [m for m in out if m is not None]


def batch_image_scores(
    scores: torch.Tensor,
    nearest: torch.Tensor,
    batch: FeatureBatch,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:
    """(P,) patch scores and (P,) nearest bank rows of a batch -> per input its image score.

    ``score`` maps the (B, p) scores, (B, p) nearest rows and (B, p, D) patch features of B inputs sharing
    one feature grid to their (B,) image scores (e.g. :func:`patchcore.core.scoring.image_scores`); it runs
    once per group of inputs of one grid, so the work it batches (eq. 7's support search) stays batched.
    """
    if len(set(batch.grids)) == 1:  # one grid: the rows are already (B, p) in input order, no copies
        b, p = len(batch), batch.grids[0][0] * batch.grids[0][1]
        return [float(v) for v in score(scores.view(b, p), nearest.view(b, p), batch.rows.view(b, p, -1)).tolist()]
    parts = list(zip(batch.split(scores), batch.split(nearest), batch.split(batch.rows)))
    out: list[float] = [0.0] * len(batch)
    for group in group_by_shape(batch.grids):
        stacked = (torch.stack([parts[i][k] for i in group]) for k in range(3))
        for i, value in zip(group, score(*stacked).tolist()):
            out[i] = float(value)
    return out
