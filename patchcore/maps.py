"""Anomaly maps: patch scores on the feature grid -> smoothed maps at the model's input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius round(truncate * sigma), like scipy.ndimage.gaussian_filter."""
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()

def symmetric_indices(size: int, radius: int) -> torch.Tensor:
    """Indices that pad a side of ``size`` by ``radius`` with half-sample symmetric reflection
    (d c b a | a b c d | d c b a), scipy.ndimage's "reflect" mode, for any radius."""
    i = torch.arange(-radius, size + radius) % (2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) -> (N, H, W) separable Gaussian smoothing, borders reflected like scipy's gaussian_filter."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    x = x.index_select(2, symmetric_indices(x.shape[2], radius).to(x.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, symmetric_indices(x.shape[3], radius).to(x.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0]


def anomaly_maps(grid_scores: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """(N, h, w) patch scores -> (N, size, size): bilinear upsampling, then Gaussian smoothing."""
    if grid_scores.ndim != 3:
        raise ValueError(f"grid scores must be (N, h, w); got {tuple(grid_scores.shape)}")
    up = F.interpolate(grid_scores[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)

