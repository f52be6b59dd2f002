"""Anomaly maps: patch scores on the feature grid -> smoothed maps at the model's input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLUR_PIXELS = 1 << 20  # map pixels blurred at once (about 7 maps of 384 x 384)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius round(truncate * sigma), like scipy.ndimage.gaussian_filter.

    >>> gaussian_kernel1d(1.0, truncate=1.0)
    tensor([0.2741, 0.4519, 0.2741])
    """
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def symmetric_indices(size: int, radius: int) -> torch.Tensor:
    """Indices that pad a side of ``size`` by ``radius`` with half-sample symmetric reflection
    (d c b a | a b c d | d c b a), scipy.ndimage's "reflect" mode, for any radius.

    >>> symmetric_indices(3, 2)
    tensor([1, 0, 0, 1, 2, 2, 1])
    """
    i = torch.arange(-radius, size + radius) % (2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) -> (N, H, W) separable Gaussian smoothing, borders reflected like scipy's gaussian_filter.

    Smoothing keeps a constant map constant and spreads a peak:

    >>> flat = torch.full((1, 5, 5), 2.0)
    >>> bool(torch.allclose(gaussian_blur(flat, 1.0), flat))
    True
    >>> peak = torch.zeros(1, 5, 5); peak[0, 2, 2] = 1.0
    >>> round(float(gaussian_blur(peak, 1.0)[0, 2, 2]), 4)
    0.1592
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    rows = symmetric_indices(maps.shape[1], radius).to(maps.device)
    cols = symmetric_indices(maps.shape[2], radius).to(maps.device)
    out = torch.empty_like(maps)
    # a few maps at a time: the convolutions' temporaries grow with the batch (+340 MB for 32 maps of 384 px)
    step = max(1, BLUR_PIXELS // max(1, maps.shape[1] * maps.shape[2]))
    for start in range(0, maps.shape[0], step):
        x = maps[start : start + step, None].index_select(2, rows)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1)).index_select(3, cols)
        out[start : start + step] = F.conv2d(x, kernel.view(1, 1, 1, -1))[:, 0]
    return out


def anomaly_maps(grid_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """(N, h, w) patch scores -> (N, H, W) at the input size (``size`` = S for S x S, or (H, W)):
    bilinear upsampling, then Gaussian smoothing.

    >>> anomaly_maps(torch.ones(2, 7, 7), 56).shape
    torch.Size([2, 56, 56])
    >>> anomaly_maps(torch.ones(1, 4, 6), (32, 48), sigma=0).shape
    torch.Size([1, 32, 48])
    """
    if grid_scores.ndim != 3:
        raise ValueError(f"grid scores must be (N, h, w); got {tuple(grid_scores.shape)}")
    shape = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(grid_scores[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)
