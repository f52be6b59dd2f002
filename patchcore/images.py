"""Image input: read anything a user may hand us into float RGB, and the resize/crop/tile geometry both ways.

Accepted images: file paths, PIL images, numpy arrays ((H, W), (H, W, 1|3|4); uint8, uint16, bool or
float in [0, 1]) and torch tensors ((C, H, W) or (H, W); same dtypes). Gray and RGBA become RGB (alpha is
dropped: the part is what matters, not the background).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import PatchCoreError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def describe(source: Any) -> str:
    """A short name for an image in messages: its path, or its type and shape."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    shape = getattr(source, "shape", None) or getattr(source, "size", "")
    return f"{type(source).__name__}{tuple(shape) if shape else ''}"


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file fully into an (H, W, 3) float32 RGB array in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return pil_to_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PatchCoreError(f"{path}: not a readable image ({exc}); replace or remove the file") from exc


def pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb_float(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def to_rgb_float(array: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16/bool/float array -> (H, W, 3) float32 in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise PatchCoreError(f"image array of shape {array.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    array = array[..., :3]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise PatchCoreError(f"image array of shape {array.shape} is empty")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype in (np.int32, np.int64) and array.min() >= 0 and array.max() <= 65535:
        # PIL's "I" mode holds 16-bit PNGs as int32.
        return array.astype(np.float32) / (65535.0 if array.max() > 255 else 255.0)
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise PatchCoreError("float images must hold finite values in [0, 1]; scale them first")
        return array.astype(np.float32)
    raise PatchCoreError(f"image arrays of dtype {array.dtype} are not supported: use uint8, uint16 or float in [0, 1]")


def load_image(source: ImageLike) -> np.ndarray:
    """Any accepted image -> (H, W, 3) float32 RGB in [0, 1]."""
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source)
    if isinstance(source, Image.Image):
        return pil_to_array(source)
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        return to_rgb_float(tensor.numpy())
    if isinstance(source, np.ndarray):
        return to_rgb_float(source)
    raise PatchCoreError(f"cannot read an image from {type(source).__name__}: pass a path, PIL image, array or tensor")


@dataclass(frozen=True)
class Geometry:
    """How an image (or one tile of it) of ``original`` (H, W) became one model input: resize, then center crop.

    Square mode (the default): resized to resize x resize, then crop x crop cut from the centre.
    keep_aspect: ``resized`` is the (H, W) after scaling the shorter side to ``resize``; ``crop`` None then
    means no crop (the input is the whole resized, possibly non-square, image).
    """

    original: tuple[int, int]
    resize: int
    crop: int | None
    resized: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) after the resize."""
        return self.resized if self.resized is not None else (self.resize, self.resize)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of the model input, and of the anomaly map at input resolution."""
        return (self.crop, self.crop) if self.crop is not None else self.size

    @property
    def offsets(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized image."""
        (h, w), (ih, iw) = self.size, self.input_shape
        return int(round((h - ih) / 2.0)), int(round((w - iw) / 2.0))

    @property
    def offset(self) -> int:
        return self.offsets[0]


@dataclass(frozen=True)
class TiledGeometry:
    """How an image of ``original`` (H, W) was tiled: scaled to ``scaled`` (H, W) (tile_scale), cut into tiles
    at ``boxes`` ((top, left, height, width) in scaled pixels), tile i preprocessed as ``tiles[i]`` says.

    The map the model yields for a tiled image is the stitched map at ``scaled`` resolution (its input_shape).
    """

    original: tuple[int, int]
    scaled: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    tiles: tuple[Geometry, ...]

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.scaled


def geometry_for(shape: tuple[int, int], resize: int, crop: int | None, keep_aspect: bool = False) -> Geometry:
    """The geometry of an image of ``shape`` (H, W): square resize (crop None = no crop), or with keep_aspect
    the shorter side scaled to ``resize`` and the aspect ratio kept."""
    shape = (int(shape[0]), int(shape[1]))
    if not keep_aspect:
        return Geometry(shape, resize, crop if crop is not None else resize)
    short = min(shape)
    resized = (max(1, round(shape[0] * resize / short)), max(1, round(shape[1] * resize / short)))
    if crop is not None and crop > min(resized):
        raise PatchCoreError(f"crop={crop} is larger than the resized image {resized[0]}x{resized[1]}")
    return Geometry(shape, resize, crop, resized)


def preprocess(
    image: np.ndarray,
    resize: int,
    crop: int | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    keep_aspect: bool = False,
) -> tuple[torch.Tensor, Geometry]:
    """(H, W, 3) float image -> normalised (3, h, w) tensor and the geometry to map results back.

    (h, w) = (crop, crop); with keep_aspect and no crop, the resized image's (H, W) (shorter side = resize).
    """
    geometry = geometry_for((image.shape[0], image.shape[1]), resize, crop, keep_aspect)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if x.shape[-2:] != geometry.size:
        x = F.interpolate(x, size=geometry.size, mode="bilinear", align_corners=False, antialias=True)
    (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
    x = x[..., oy : oy + ih, ox : ox + iw].clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t)[0], geometry


def mask_to_input(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """(H, W) ground-truth mask -> (crop, crop) bool, resized (nearest) and cropped like its image."""
    m = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(resize, resize), mode="nearest")
    o = int(round((resize - crop) / 2.0))
    return m[0, 0, o : o + crop, o : o + crop].numpy() > 0.5


def mask_to_map(mask: np.ndarray, geometry: Geometry | TiledGeometry) -> np.ndarray:
    """(H, W) ground-truth mask -> bool mask on the pixels of its image's map as the model yields it
    (``geometry.input_shape``): resized (nearest) and cropped like the image; for a tiled image, resized
    to the scaled image (the original pixels when tile_scale is 1)."""
    mask = np.asarray(mask)
    if isinstance(geometry, TiledGeometry):
        target = geometry.scaled
    elif geometry.resized is None and geometry.crop is not None:
        return mask_to_input(mask, geometry.resize, geometry.crop)  # the square path, exactly as before
    else:
        target = geometry.size
    m = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))[None, None]
    if tuple(m.shape[-2:]) != tuple(target):
        m = F.interpolate(m, size=tuple(target), mode="nearest")
    if isinstance(geometry, Geometry):
        (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
        m = m[..., oy : oy + ih, ox : ox + iw]
    return m[0, 0].numpy() > 0.5


def _place(anomaly_map: np.ndarray, geometry: Geometry, fill: float | None) -> np.ndarray:
    """An input-resolution map -> the image of ``geometry.original``; outside the crop: fill (None: its min)."""
    amap = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))
    if tuple(amap.shape) != tuple(geometry.input_shape):
        raise PatchCoreError(f"anomaly map of shape {tuple(amap.shape)} does not match the input shape {geometry.input_shape}")
    canvas = torch.full(geometry.size, float(amap.min()) if fill is None else fill)
    (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
    canvas[oy : oy + ih, ox : ox + iw] = amap
    out = F.interpolate(canvas[None, None], size=geometry.original, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def map_to_original(anomaly_map: np.ndarray, geometry: Geometry | TiledGeometry) -> np.ndarray:
    """Map at input resolution -> (H, W) map on the original image; what the crop cut away gets the map's
    minimum. A tiled image's map (already stitched at the scaled size) is only resized, when scaled."""
    if isinstance(geometry, TiledGeometry):
        amap = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))
        if tuple(amap.shape) != tuple(geometry.scaled):
            raise PatchCoreError(f"anomaly map of shape {tuple(amap.shape)} does not match the tiled image {geometry.scaled}")
        if tuple(geometry.scaled) == tuple(geometry.original):
            return amap.numpy().copy()
        return F.interpolate(amap[None, None], size=geometry.original, mode="bilinear", align_corners=False)[0, 0].numpy()
    return _place(anomaly_map, geometry, None)


# ---------------------------------------------------------------------------------------------- tiling
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
        x, _ = preprocess(image[top : top + h, left : left + w], tile.resize, tile.crop, mean, std, keep_aspect=tile.resized is not None)
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
            seen = torch.from_numpy(_place(np.ones(tile.input_shape, np.float32), tile, 0.0))
        weight[top : top + h, left : left + w] += seen
        if maps is not None:
            values = torch.from_numpy(_place(maps[i], tile, None))
            total[top : top + h, left : left + w] += values if tile.input_shape == tile.size else values * seen
    return total, weight


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """A ground-truth mask file -> (H, W) bool (any non-zero pixel is defective)."""
    image = read_image_file(path)
    return image.max(axis=-1) > 0


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path; hidden files skipped."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
