"""Geometry: how an image becomes one model input (resize, centre crop, keep-aspect, normalisation), and
how a map at input resolution goes back onto the original image. The one definition of preprocessing.

numpy and Pillow only (the torch-free runtime uses it); :mod:`.tensors` holds the torch side, which
resizes with torch's own kernels: :mod:`.resample` gives the same pixels without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PatchCoreError
from .resample import resize_antialiased, resize_bilinear, resize_nearest


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


def preprocess_array(
    image: np.ndarray,
    resize: int,
    crop: int | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    keep_aspect: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """(H, W, 3) float image -> normalised (3, h, w) float32 array and its geometry: the pixels
    :func:`patchcore.imaging.tensors.preprocess` gives, computed without torch (to float32 rounding)."""
    geometry = geometry_for((image.shape[0], image.shape[1]), resize, crop, keep_aspect)
    x = resize_antialiased(np.asarray(image, dtype=np.float32), geometry.size)
    (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
    x = np.clip(x[oy : oy + ih, ox : ox + iw], 0.0, 1.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), geometry


def place_map(anomaly_map: np.ndarray, geometry: Geometry, fill: float | None) -> np.ndarray:
    """An input-resolution map -> the image of ``geometry.original``; outside the crop: fill (None: its min)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if tuple(amap.shape) != tuple(geometry.input_shape):
        raise PatchCoreError(
            f"anomaly map of shape {tuple(amap.shape)} does not match the input shape {geometry.input_shape}"
        )
    canvas = np.full(geometry.size, float(amap.min()) if fill is None else fill, dtype=np.float32)
    (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
    canvas[oy : oy + ih, ox : ox + iw] = amap
    return resize_bilinear(canvas, geometry.original)


def map_to_original(anomaly_map: np.ndarray, geometry: Geometry | TiledGeometry) -> np.ndarray:
    """Map at input resolution -> (H, W) map on the original image; what the crop cut away gets the map's
    minimum. A tiled image's map (already stitched at the scaled size) is only resized, when scaled."""
    if isinstance(geometry, TiledGeometry):
        amap = np.asarray(anomaly_map, dtype=np.float32)
        if tuple(amap.shape) != tuple(geometry.scaled):
            raise PatchCoreError(
                f"anomaly map of shape {tuple(amap.shape)} does not match the tiled image {geometry.scaled}"
            )
        return resize_bilinear(amap, geometry.original)
    return place_map(anomaly_map, geometry, None)


def mask_to_input(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """(H, W) ground-truth mask -> (crop, crop) bool, resized (nearest) and cropped like its image."""
    m = resize_nearest(np.asarray(mask) > 0, (resize, resize))
    o = int(round((resize - crop) / 2.0))
    return m[o : o + crop, o : o + crop]


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
    m = resize_nearest(mask > 0, target)
    if isinstance(geometry, Geometry):
        (oy, ox), (ih, iw) = geometry.offsets, geometry.input_shape
        m = m[oy : oy + ih, ox : ox + iw]
    return m
