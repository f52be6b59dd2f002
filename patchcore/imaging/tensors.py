"""The torch side of preprocessing: an image to a normalised input tensor, and ground-truth masks onto
the model's maps. :func:`patchcore.imaging.geometry.preprocess_array` computes the same input without torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Geometry, TiledGeometry, geometry_for


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
