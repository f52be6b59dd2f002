"""Where memory-bank rows come from, and explanations built on it.

Every bank row is a patch of one training image: :class:`SourceLog` records, while features are extracted,
which image, tile and feature-grid cell each row came from and the box that cell covers on the original
image, so a coreset's chosen row indices can be turned into ``bank_source`` rows
(:data:`SOURCE_COLUMNS`, int32, -1 where not recorded). A model stores them beside the bank with the
training images' paths relative to the data folder (``train_paths``), and :class:`Explanation` says, for
the most anomalous patch of an image, which normal patch it is closest to.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PatchCoreError
from ..imaging import Geometry, TiledGeometry, read_image_file

if TYPE_CHECKING:
    from .feature_batches import FeatureBatch

#: The columns of a ``bank_source`` row: training image index, tile index (0 without tiles), feature-grid row
#: and column, and the box the cell covers on the original training image (top, left, bottom, right; pixels).
SOURCE_COLUMNS = ("image", "tile", "row", "col", "top", "left", "bottom", "right")
NOT_RECORDED = -1


def cell_box(geometry: Geometry | TiledGeometry, tile: int, grid: tuple[int, int], cell: tuple[int, int]) -> tuple:
    """The box (top, left, bottom, right) on the original image that feature-grid ``cell`` (row, col) of a
    ``grid`` (h, w) covers, for the input ``tile`` of an image of this geometry (its stride, not its
    receptive field)."""
    if isinstance(geometry, TiledGeometry):
        g = geometry.tiles[tile]
        base_top, base_left, _, _ = geometry.boxes[tile]
        scale_y = geometry.original[0] / geometry.scaled[0]
        scale_x = geometry.original[1] / geometry.scaled[1]
        limit = geometry.original
    else:
        g, base_top, base_left, scale_y, scale_x, limit = geometry, 0, 0, 1.0, 1.0, geometry.original
    (ih, iw), (oy, ox), (rh, rw), (gh, gw) = g.input_shape, g.offsets, g.size, g.original
    (h, w), (row, col) = grid, cell

    def span(index: int, cells: int, inside: int, offset: int, resized: int, original: int, base: int, scale: float):
        low = ((index * inside / cells + offset) * original / resized + base) * scale
        high = (((index + 1) * inside / cells + offset) * original / resized + base) * scale
        return low, high

    y0, y1 = span(row, h, ih, oy, rh, gh, base_top, scale_y)
    x0, x1 = span(col, w, iw, ox, rw, gw, base_left, scale_x)
    top, left = max(0, math.floor(y0)), max(0, math.floor(x0))
    bottom, right = min(limit[0], max(top + 1, math.ceil(y1))), min(limit[1], max(left + 1, math.ceil(x1)))
    return int(top), int(left), int(bottom), int(right)


class SourceLog:
    """Watches the feature batches of a fit and maps stream positions of patch rows back to their source.

    Holds one small record per model input (an image, or a tile), never one per row, so it adds nothing
    that grows with the bank to a bounded-memory (streaming) fit.
    """

    def __init__(self, first_image: int = 0) -> None:
        self.starts: list[int] = []
        self.inputs: list[tuple[int, int, int, int, Geometry | TiledGeometry]] = []
        self.rows = 0
        self.image = first_image
        self.tile = 0

    def watch(self, batches: Iterator[FeatureBatch]) -> Iterator[FeatureBatch]:
        """Pass feature batches through, recording each input (its rows follow the previous input's)."""
        for batch in batches:
            for (h, w), (geometry, last) in zip(batch.grids, batch.owners):
                self.starts.append(self.rows)
                self.inputs.append((self.image, self.tile, h, w, geometry))
                self.rows += h * w
                self.image, self.tile = (self.image + 1, 0) if last else (self.image, self.tile + 1)
            yield batch

    def sources(self, positions: Any) -> np.ndarray:
        """(K, 8) int32 ``bank_source`` rows of the rows at these stream positions."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.full((len(positions), len(SOURCE_COLUMNS)), NOT_RECORDED, dtype=np.int32)
        if not len(positions):
            return out
        which = np.searchsorted(np.asarray(self.starts, dtype=np.int64), positions, side="right") - 1
        for k, (position, i) in enumerate(zip(positions.tolist(), which.tolist())):
            image, tile, h, w, geometry = self.inputs[i]
            local = position - self.starts[i]
            row, col = divmod(local, w)
            out[k] = (image, tile, row, col, *cell_box(geometry, tile, (h, w), (row, col)))
        return out


def train_paths(images: Sequence[Any], root: str | os.PathLike | None) -> list[str | None]:
    """Each training image's path relative to ``root`` (the data folder) as POSIX text; None for images
    given as arrays. Without a root (or for a path outside it), relative to the images' common folder."""
    paths = [Path(image) if isinstance(image, (str, os.PathLike)) else None for image in images]
    resolved = [p.resolve() for p in paths if p is not None]
    if not resolved:
        return [None] * len(paths)
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    base = Path(root).resolve() if root is not None else common
    out: list[str | None] = []
    for path in paths:
        if path is None:
            out.append(None)
            continue
        full = path.resolve()
        anchor = base if full.is_relative_to(base) else common
        out.append(full.relative_to(anchor).as_posix())
    return out


def check_sources(bank_source: np.ndarray, paths: Any, rows: int) -> list[str | None]:
    """Validate a stored ``bank_source`` (rows, 8) int32 against ``train_paths``; returns the paths."""
    if not isinstance(paths, list) or not all(p is None or isinstance(p, str) for p in paths):
        raise PatchCoreError("train_paths must be a list of relative paths (text) or nulls")
    if bank_source.dtype != np.int32 or bank_source.shape != (rows, len(SOURCE_COLUMNS)):
        raise PatchCoreError(f"bank_source must be ({rows}, {len(SOURCE_COLUMNS)}) int32")
    images = bank_source[:, 0]
    if len(images) and (images.min() < NOT_RECORDED or images.max() >= len(paths)):
        raise PatchCoreError("bank_source names training images that train_paths does not list")
    for path in paths:
        if path is not None and not safe_relative(path):
            raise PatchCoreError(f"train_paths entry {path!r} must be a relative path inside the data folder")
    return list(paths)


def safe_relative(path: str) -> bool:
    """A relative POSIX path that stays inside the folder it is joined to."""
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts and "\\" not in path


@dataclass
class Explanation:
    """Why an image scored as it did: its most anomalous patch and the normal patch closest to it.

    ``patch``: tile, grid row and column, box (top, left, bottom, right) on the original image and the patch
    score. ``nearest``: the bank row, and where recorded, the training image (index and path relative to
    the data folder), tile, grid cell and box; ``status`` says whether a crop could be made ("ok") and if
    not, why ("not recorded", "the training image was given as an array", "not readable: ..."). Crops are
    uint8 (H, W, 3): the patch's box grown by one cell on each side, on the image and on the training image.
    """

    score: float
    patch: dict[str, Any]
    nearest: dict[str, Any]
    status: str
    patch_crop: np.ndarray | None = field(default=None, repr=False)
    nearest_crop: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (the crops are arrays; encode them as pictures separately)."""
        return {"score": self.score, "patch": self.patch, "nearest": self.nearest, "status": self.status}


def context_box(box: Sequence[int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` grown by its own size on each side, within an image of ``shape``."""
    top, left, bottom, right = (int(v) for v in box)
    dy, dx = bottom - top, right - left
    return max(0, top - dy), max(0, left - dx), min(shape[0], bottom + dy), min(shape[1], right + dx)


def crop(pixels: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """uint8 crop of an (H, W, 3) float image in [0, 1]."""
    top, left, bottom, right = box
    return np.round(np.clip(pixels[top:bottom, left:right], 0, 1) * 255).astype(np.uint8)


def nearest_patch(
    source: np.ndarray | None,
    paths: list[str | None],
    bank_row: int,
    data_roots: Sequence[str | os.PathLike],
    max_pixels: int | None,
) -> tuple[dict[str, Any], str, np.ndarray | None]:
    """(description, status, crop) of bank row ``bank_row``: where it came from and a crop of its training
    image when that file is found under one of ``data_roots`` (never outside them)."""
    info: dict[str, Any] = {"bank_row": int(bank_row)}
    if source is None or source[bank_row, 0] == NOT_RECORDED:
        return (
            info,
            "not recorded: this model file does not say where its bank rows came from (refit to record it)",
            None,
        )
    image, tile, row, col, *box = (int(v) for v in source[bank_row])
    path = paths[image]
    info.update({"image_index": image, "path": path, "tile": tile, "row": row, "col": col, "box": box})
    if path is None:
        return info, "the training image was given as an array: no file to crop", None
    if not safe_relative(path):
        return info, "not readable: the recorded path leaves the data folder", None
    if not data_roots:
        return info, "not readable: no data folder given (patchcore serve --data DIR, explain(data_root=DIR))", None
    for root in data_roots:
        base = Path(root).resolve()
        candidate = (base / path).resolve()
        if not candidate.is_relative_to(base) or not candidate.is_file():
            continue
        try:
            pixels = read_image_file(candidate, max_pixels)
        except PatchCoreError as exc:
            return info, f"not readable: {exc}", None
        info["crop_box"] = list(context_box(box, pixels.shape[:2]))
        return info, "ok", crop(pixels, info["crop_box"])
    return info, f"not readable: {path} is not under {', '.join(str(r) for r in data_roots)}", None
