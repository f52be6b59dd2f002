"""Locally aware patch features (PatchCore section 3.1): pure functions on feature maps.

Each position of each level gets the average of its p x p neighbourhood (zero padding keeps the grid);
deeper levels are upsampled bilinearly to the finest level's grid; the levels are then joined into one
vector per position, either by concatenation (``target_dim=None``) or, like the official code, by
adaptive average pooling of each level to ``target_dim`` and of the stack to ``target_dim``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_average(feature_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): mean over each p x p neighbourhood, zeros outside the map counted.

    >>> local_average(torch.ones(1, 1, 3, 3), 3)[0, 0]
    tensor([[0.4444, 0.6667, 0.4444],
            [0.6667, 1.0000, 0.6667],
            [0.4444, 0.6667, 0.4444]])
    """
    if patch_size == 1:
        return feature_map
    return F.avg_pool2d(feature_map, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, C) -> (N, dim) by adaptive average pooling along the channels."""
    return F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0, :]


def patch_features(
    feature_maps: list[torch.Tensor], patch_size: int = 3, target_dim: int | None = None
) -> torch.Tensor:
    """Per-level maps [(B, C_l, H_l, W_l)], finest first -> (B, H_0, W_0, D) patch features.

    D = sum of C_l when ``target_dim`` is None, else ``target_dim``.

    >>> level2, level3 = torch.ones(2, 40, 28, 28), torch.ones(2, 80, 14, 14)
    >>> patch_features([level2, level3]).shape
    torch.Size([2, 28, 28, 120])
    >>> patch_features([level2, level3], target_dim=64).shape
    torch.Size([2, 28, 28, 64])
    """
    if not feature_maps:
        raise ValueError("patch_features needs at least one feature map")
    batch, _, height, width = feature_maps[0].shape
    levels = []
    for fmap in feature_maps:
        if fmap.ndim != 4 or fmap.shape[0] != batch:
            raise ValueError(f"feature maps must be (B, C, H, W) with one batch size; got {tuple(fmap.shape)}")
        fmap = local_average(fmap, patch_size)
        if fmap.shape[-2:] != (height, width):
            fmap = F.interpolate(fmap, size=(height, width), mode="bilinear", align_corners=False)
        levels.append(fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]))
    if target_dim is None:
        joined = torch.cat(levels, dim=1)
    else:
        joined = pool_channels(torch.cat([pool_channels(level, target_dim) for level in levels], dim=1), target_dim)
    return joined.reshape(batch, height, width, -1)
