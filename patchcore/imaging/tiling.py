"""Tiling of high-resolution images: tile boxes, each tile's model input, and stitching tile maps back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PatchCoreError
from .geometry import TiledGeometry, geometry_for, place_map
from .tensors import preprocess


def tile_positions(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels, neighbours overlapping by at least
    ``overlap`` of a tile, spread evenly from 0 to length - tile (one tile when length <= tile)."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = -(-(length - tile) // stride) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def tile_geometry(
    shape: tuple[int, int],
    tile_size: int,
    overlap: float,
    scale: float,
    resize: int,
    crop: int | None,
    keep_aspect: bool = False,
) -> TiledGeometry:
    """Tiles of an image of ``shape`` (H, W) after scaling by ``scale``: boxes, row by row, and each tile's
    preprocessing geometry. A side shorter than the tile gives tiles as long as that side."""
    original = (int(shape[0]), int(shape[1]))
    scaled = original if scale == 1 else (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
    boxes = tuple(
        (top, left, min(tile_size, scaled[0]), min(tile_size, scaled[1]))
        for top in tile_positions(scaled[0], tile_size, overlap)
        for left in tile_positions(scaled[1], tile_size, overlap)
    )
    tiles = tuple(geometry_for((h, w), resize, crop, keep_aspect) for _, _, h, w in boxes)
    return TiledGeometry(original, scaled, boxes, tiles)


def tile_inputs(
    image: np.ndarray, geometry: TiledGeometry, mean: tuple[float, ...], std: tuple[float, ...]
) -> Iterator[torch.Tensor]:
    """The normalised model input of every tile of ``image`` (H, W, 3), lazily, in ``geometry.boxes`` order."""
    if tuple(image.shape[:2]) != tuple(geometry.scaled):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=geometry.scaled, mode="bilinear", align_corners=False, antialias=True)
        image = x[0].clamp_(0.0, 1.0).permute(1, 2, 0).numpy()
    for (top, left, h, w), tile in zip(geometry.boxes, geometry.tiles):
        x, _ = preprocess(
            image[top : top + h, left : left + w],
            tile.resize,
            tile.crop,
            mean,
            std,
            keep_aspect=tile.resized is not None,
        )
        yield x


def tile_coverage(geometry: TiledGeometry) -> np.ndarray:
    """(H, W) at the scaled size: how much of each pixel the tiles' model inputs saw (sum over tiles of the
    share of the pixel inside each tile's crop; 0 = seen by none)."""
    return _stitch(None, geometry)[1].numpy()


def stitch_maps(maps: Sequence[np.ndarray], geometry: TiledGeometry) -> np.ndarray:
    """Tile maps at input resolution -> one (H, W) map at the scaled image size: each tile's map is put back
    on its box (like :func:`map_to_original`), overlaps are averaged, weighted by how much of each pixel the
    tile's crop saw; pixels no crop saw get the minimum of all tile maps."""
    out, weight = _stitch(maps, geometry)
    fill = min(float(np.min(m)) for m in maps)
    return torch.where(weight > 0, out / weight.clamp_min(1e-12), torch.tensor(fill)).numpy()


def _stitch(maps: Sequence[np.ndarray] | None, geometry: TiledGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    if maps is not None and len(maps) != len(geometry.boxes):
        raise PatchCoreError(f"{len(maps)} tile maps for {len(geometry.boxes)} tiles")
    total = torch.zeros(geometry.scaled)
    weight = torch.zeros(geometry.scaled)
    for i, ((top, left, h, w), tile) in enumerate(zip(geometry.boxes, geometry.tiles)):
        if tile.input_shape == tile.size:  # no crop: the whole tile was seen
            seen = torch.ones(h, w)
        else:
            seen = torch.from_numpy(place_map(np.ones(tile.input_shape, np.float32), tile, 0.0))
        weight[top : top + h, left : left + w] += seen
        if maps is not None:
            values = torch.from_numpy(place_map(maps[i], tile, None))
            total[top : top + h, left : left + w] += values if tile.input_shape == tile.size else values * seen
    return total, weight
