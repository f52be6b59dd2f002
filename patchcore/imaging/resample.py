"""Resampling in numpy and Pillow only, equal to the torch kernels the model path uses.

The torch-free runtime (:mod:`patchcore.runtime`) prepares images and maps with these functions, so they
must give what ``torch.nn.functional.interpolate`` gives (tested side by side in tests/test_resample.py):

- :func:`resize_antialiased` = ``interpolate(mode="bilinear", align_corners=False, antialias=True)``, the
  resize of every model input. Pillow's float ("F") bilinear resize is the same algorithm (a triangle
  filter widened by the scale when shrinking, weights normalised at the borders): torch's antialiased
  kernel was written after it. They agree to float32 rounding (about 1e-5 on [0, 1] pixels).
- :func:`resize_bilinear` = ``interpolate(mode="bilinear", align_corners=False)`` without antialiasing,
  which puts anomaly maps back onto the original image.
- :func:`resize_nearest` = ``interpolate(mode="nearest")``, which puts ground-truth masks onto the maps.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_antialiased(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) or (H, W) float32 -> (h, w[, C]) float32, ``size`` = (h, w); the input itself when the size
    is unchanged (torch's path skips the resize then too).

    >>> resize_antialiased(np.ones((4, 6, 3), np.float32), (2, 3)).shape
    (2, 3, 3)
    """
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[:2]) == (h, w):
        return image
    if image.ndim == 2:
        plane = Image.fromarray(np.ascontiguousarray(image, np.float32), mode="F")
        return np.asarray(plane.resize((w, h), Image.Resampling.BILINEAR))
    channels = [resize_antialiased(image[..., c], (h, w)) for c in range(image.shape[2])]
    return np.stack(channels, axis=-1)


def _source_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source positions (align_corners=False), in its float32 arithmetic: lower index,
    upper index, and their weights."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, np.float32(1) - frac, frac


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 -> (h, w) float32 by plain bilinear interpolation (no antialiasing).

    >>> resize_bilinear(np.array([[0.0, 1.0]], np.float32), (1, 4)).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    """
    array = np.asarray(array, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if array.shape == (h, w):
        return array.copy()
    low, high, w_low, w_high = _source_weights(array.shape[1], w)  # along the width first, like torch
    cols = array[:, low] * w_low + array[:, high] * w_high
    low, high, w_low, w_high = _source_weights(array.shape[0], h)
    return cols[low] * w_low[:, None] + cols[high] * w_high[:, None]


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> (h, w) by torch's "nearest" (source index floor(i * H / h) in float32), any dtype.

    >>> resize_nearest(np.array([[1, 2, 3]]), (1, 6)).tolist()
    [[1, 1, 2, 2, 3, 3]]
    """
    array = np.asarray(array)
    h, w = int(size[0]), int(size[1])
    rows = _nearest(array.shape[0], h)
    cols = _nearest(array.shape[1], w)
    return array[rows[:, None], cols[None, :]]


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
