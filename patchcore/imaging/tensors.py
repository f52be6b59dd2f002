"""The torch side of preprocessing: an image to a normalised input tensor.
:func:`patchcore.imaging.geometry.preprocess_array` computes the same input without torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Geometry, geometry_for


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
