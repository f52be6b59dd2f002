"""Anomaly maps: patch scores on the feature grid -> smoothed maps at the model's input resolution."""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=32)
def _smoothing_operator(size: int, out: int, sigma: float) -> torch.Tensor:
    """(out, size) matrix A with A @ v = blur(upsample(v)) for a 1-D signal v of length ``size``.

    Bilinear upsampling (align_corners=False) and the reflected Gaussian are both linear and act on rows
    and columns separately, so a whole map is A_H @ S @ A_W^T: two small matrix products instead of
    upsampling to (H, W) and blurring there (about 20x fewer operations at 48 -> 384 px). The matrix is
    built by running the reference ops on the identity, so it is exactly their composition.
    """
    eye = torch.eye(size, dtype=torch.float64)[:, None, None, :]  # (size, 1, 1, size): one impulse per row
    up = F.interpolate(eye, size=(1, out), mode="bilinear", align_corners=False)[:, 0]  # (size, 1, out)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma).double()
        radius = kernel.numel() // 2
        padded = up[:, 0].index_select(1, symmetric_indices(out, radius))
        up = F.conv1d(padded[:, None], kernel.view(1, 1, -1))
    return up[:, 0].T.contiguous().float()  # (out, size)


def anomaly_maps(grid_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """(N, h, w) patch scores -> (N, H, W) at the input size (``size`` = S for S x S, or (H, W)):
    bilinear upsampling, then Gaussian smoothing (borders reflected like scipy's gaussian_filter), computed
    as two separable matrix products (see :func:`_smoothing_operator`).

    >>> anomaly_maps(torch.ones(2, 7, 7), 56).shape
    torch.Size([2, 56, 56])
    >>> anomaly_maps(torch.ones(1, 4, 6), (32, 48), sigma=0).shape
    torch.Size([1, 32, 48])
    """
    if grid_scores.ndim != 3:
        raise ValueError(f"grid scores must be (N, h, w); got {tuple(grid_scores.shape)}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    rows = _smoothing_operator(grid_scores.shape[1], height, float(sigma)).to(grid_scores)
    cols = _smoothing_operator(grid_scores.shape[2], width, float(sigma)).to(grid_scores)
    return torch.matmul(rows, grid_scores @ cols.T)
