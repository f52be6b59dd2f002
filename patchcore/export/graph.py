"""A fitted PatchCore as one torch module that ONNX can hold: normalised inputs to image scores and maps.

Every stage is the model's own, in operations every ONNX runtime has:

- the backbone, then the locally aware patch features (:func:`patchcore.core.features.patch_features`);
  with ``target_dim`` the channel pooling is a fixed averaging matrix, which is what adaptive average
  pooling computes (ONNX has no adaptive pooling for sizes that do not divide);
- the nearest-neighbour search as matrix products and a minimum, over the memory bank in chunks of
  ``chunk_rows`` rows (the bank is one initializer; a chunk is a slice of it). Distances are
  ``|q|^2 + (|b|^2 - 2 q.b)``, clamped at 0, exactly as :func:`patchcore.core.knn.knn` computes them, and
  at most (patches x chunk_rows) of them exist at once, never a broadcast (patches x bank x D) ``cdist``;
- the scoring mode (:mod:`patchcore.core.scoring_modes`) and its aggregation, with eq. 7's reweighting:
  the support of the nearest bank row m* is its ``num_neighbors`` nearest bank rows, m* itself first;
- with a global branch (:mod:`patchcore.detectors.global_branch`), the mean patch feature's Mahalanobis
  distance on the bank's scale, and the image score the larger of the two;
- with a coarse bank (:mod:`patchcore.detectors.coarse_branch`), a second graph of the same kind on the input
  (average-pooled by its ``input_pool`` where ``coarse_pool`` asks for it), its map pixels put onto
  the fine bank's scale and every map pixel the mean of the two (the image score is the fine bank's);
- bilinear upsampling to the input size and the Gaussian blur with scipy's reflected borders
  (:mod:`patchcore.core.maps`), the reflection indices computed from the input's own size, so that inputs
  of any size (keep-aspect models) take the same graph.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..backbones.efficientnet_lite import SameConv2d
from ..config import PatchCoreConfig
from ..core.features import local_average
from ..core.maps import gaussian_kernel1d, symmetric_indices
from ..core.scoring_modes import scoring_rule
from ..detectors.coarse_branch import CoarseBranch
from ..detectors.global_branch import GlobalBranch

# Distances held at once per input image (patches x chunk_rows, 16 MiB of fp32 at most): the graph's
# largest intermediate stays bounded whatever the bank size.
DISTANCES_PER_IMAGE = 1 << 22


def pooling_matrix(channels: int, dim: int) -> torch.Tensor:
    """(channels, dim): x @ P = adaptive average pooling of x's last axis from ``channels`` to ``dim``.

    >>> x = torch.arange(10.0)[None]
    >>> bool(torch.allclose(x @ pooling_matrix(10, 4), F.adaptive_avg_pool1d(x[None], 4)[0]))
    True
    """
    matrix = torch.zeros(channels, dim)
    for i in range(dim):
        start, stop = (i * channels) // dim, -(-((i + 1) * channels) // dim)
        matrix[start:stop, i] = 1.0 / (stop - start)
    return matrix


class PatchCoreGraph(nn.Module):
    """(N, 3, H, W) normalised inputs -> (image scores (N,), anomaly maps (N, H, W)) of a fitted PatchCore.

    ``feature_channels``: the backbone's channels per level, finest first.
    """

    bank: torch.Tensor
    bank_sq: torch.Tensor
    kernel: torch.Tensor
    squared: bool
    reweight: bool
    k: int
    top_k: int
    num_neighbors: int
    least_side: int
    global_mean: torch.Tensor
    global_scale: torch.Tensor
    global_precision: torch.Tensor

    def __init__(
        self,
        backbone: Backbone,
        bank: torch.Tensor,
        config: PatchCoreConfig,
        feature_channels: list[int],
        patches: int,
        global_branch: GlobalBranch | None = None,
        coarse: CoarseBranch | None = None,
    ) -> None:
        super().__init__()
        self.pool = config.input_pool
        self.backbone = copy.deepcopy(backbone)
        for module in self.backbone.modules():
            if isinstance(module, SameConv2d):
                module.pad_inputs = True
        self.register_buffer("bank", bank.detach().float().contiguous())
        self.register_buffer("bank_sq", (self.bank * self.bank).sum(dim=1))
        rule = scoring_rule(config.scoring)
        self.squared, self.reweight = rule.squared, rule.reweight
        self.k = min(config.k, bank.shape[0]) if rule.squared else 1
        self.top_k = int(config.image_top_k if config.image_top_k is not None else rule.default_top_k)
        self.num_neighbors = min(config.num_neighbors, bank.shape[0])
        self.patch_size = config.patch_size
        self.least_side = config.crop or config.resize  # keep-aspect inputs are at least this long on each side
        self.chunk_rows = max(1, DISTANCES_PER_IMAGE // max(1, patches))
        self.sigma = float(config.sigma)
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1))
        self.target_dim = config.target_dim
        self.level_pooling = nn.ParameterList()
        if config.target_dim is not None:
            for channels in feature_channels:
                self.level_pooling.append(nn.Parameter(pooling_matrix(channels, config.target_dim), False))
            joined = config.target_dim * len(feature_channels)
            self.final_pooling = nn.Parameter(pooling_matrix(joined, config.target_dim), False)
        self.has_global = global_branch is not None
        if global_branch is not None:
            if global_branch.affine is None:
                raise ValueError("the global branch is not calibrated")
            gaussian = global_branch.gaussian
            for name, value in (("mean", gaussian.mean), ("scale", gaussian.scale), ("precision", gaussian.precision)):
                self.register_buffer(f"global_{name}", torch.as_tensor(value, dtype=torch.float32))
            self.global_offset, self.global_slope = (float(v) for v in global_branch.affine)
        self.has_coarse = coarse is not None
        if coarse is not None:
            if coarse.map_affine is None:
                raise ValueError("the coarse bank is not calibrated")
            self.coarse = coarse_graph(coarse)
            self.coarse_map_offset, self.coarse_map_slope = (float(v) for v in coarse.map_affine)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h, w, D), as :func:`patchcore.core.features.patch_features`."""
        maps = self.backbone.features(x)
        height, width = maps[0].shape[-2], maps[0].shape[-1]
        levels = []
        for i, fmap in enumerate(maps):
            fmap = local_average(fmap, self.patch_size)
            if i > 0:
                fmap = F.interpolate(fmap, size=(height, width), mode="bilinear", align_corners=False)
            level = fmap.permute(0, 2, 3, 1)
            levels.append(level @ self.level_pooling[i] if self.target_dim is not None else level)
        joined = torch.cat(levels, dim=-1)
        return joined @ self.final_pooling if self.target_dim is not None else joined

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, D) -> (squared distances (P, k) ascending, bank rows (P, k)), chunk by chunk over the bank."""
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        rows = self.bank.shape[0]
        for start in range(0, rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, rows)
            partial = self.bank_sq[start:stop][None, :] - 2.0 * (queries @ self.bank[start:stop].T)
            if self.k == 1:
                value, index = partial.min(dim=1, keepdim=True)
            else:
                value, index = partial.topk(min(self.k, stop - start), dim=1, largest=False)
            index = index + start
            if best_d is None or best_i is None:
                best_d, best_i = value, index
            elif self.k == 1:
                better = value < best_d
                best_d, best_i = torch.where(better, value, best_d), torch.where(better, index, best_i)
            else:
                both_d, both_i = torch.cat([best_d, value], dim=1), torch.cat([best_i, index], dim=1)
                best_d, order = both_d.topk(self.k, dim=1, largest=False)
                best_i = both_i.gather(1, order)
        assert best_d is not None and best_i is not None
        return (best_d + (queries * queries).sum(dim=1, keepdim=True)).clamp_min(0.0), best_i

    def reweighting(self, patches: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7's factor per image: patches (N, D) the most anomalous patch, nearest (N,) its bank row."""
        m_star = self.bank[nearest]
        to_bank = self.bank_sq[None, :] - 2.0 * (m_star @ self.bank.T)
        rows = torch.arange(self.bank.shape[0], device=nearest.device)
        to_bank = torch.where(rows[None, :] == nearest[:, None], torch.full_like(to_bank, -torch.inf), to_bank)
        support = to_bank.topk(self.num_neighbors, dim=1, largest=False).indices  # (N, b), m* first
        distances = torch.linalg.vector_norm(self.bank[support] - patches[:, None, :], dim=2)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, H, W), :func:`patchcore.core.maps.gaussian_blur` in one pass."""
        if self.sigma <= 0:
            return maps[:, 0]
        radius = self.kernel.shape[0] // 2
        height, width = maps.shape[-2], maps.shape[-1]
        rows = reflect_indices(height, radius, maps.device, self.least_side)
        cols = reflect_indices(width, radius, maps.device, self.least_side)
        x = F.conv2d(maps.index_select(2, rows), self.kernel.view(1, 1, -1, 1))
        return F.conv2d(x.index_select(3, cols), self.kernel.view(1, 1, 1, -1))[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.patch_features(F.avg_pool2d(x, self.pool) if self.pool > 1 else x)
        batch, h, w, dim = feats.shape
        flat = feats.reshape(-1, dim)
        dists, index = self.nearest(flat)
        scores = (dists.mean(dim=1) if self.squared else dists[:, 0].sqrt()).reshape(batch, h * w)
        nearest = index[:, 0].reshape(batch, h * w)
        top = scores.argmax(dim=1, keepdim=True)
        if self.top_k == 1:
            image = scores.gather(1, top)[:, 0]
        else:
            image = scores.topk(min(self.top_k, h * w), dim=1).values.mean(dim=1)
        if self.reweight:
            worst = feats.reshape(batch, h * w, dim).gather(1, top[:, :, None].expand(batch, 1, dim))[:, 0]
            image = image * self.reweighting(worst, nearest.gather(1, top)[:, 0])
        if self.has_global:
            q = (feats.reshape(batch, h * w, dim).mean(dim=1) - self.global_mean) / self.global_scale
            distance = ((q @ self.global_precision) * q).sum(dim=1).clamp_min(0.0).sqrt()
            image = torch.maximum(image, self.global_offset + self.global_slope * distance)
        up = F.interpolate(scores.reshape(batch, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        maps = self.blur(up)
        if self.has_coarse:
            _, coarse_maps = self.coarse(x)  # the image score stays the fine bank's
            maps = (maps + (self.coarse_map_offset + self.coarse_map_slope * coarse_maps)) / 2
        return image, maps


def coarse_graph(coarse: CoarseBranch) -> PatchCoreGraph:
    """The graph of a coarse bank's own model (:class:`PatchCoreGraph` on its pooled inputs)."""
    model = coarse.model
    bank = model.memory_bank_.detach().cpu()
    channels = [info.channels for info in model.backbone_.feature_info]
    return PatchCoreGraph(model.backbone_, bank, model.config, channels, graph_patches(model))


def graph_patches(model) -> int:
    """Patches of the finest feature grid of one square input of ``model`` (it sizes the search's chunks)."""
    cfg = model.config
    side = (cfg.crop if cfg.crop is not None else cfg.resize) // cfg.input_pool
    return max(1, (side // model.backbone_.feature_info[0].stride) ** 2)


def reflect_indices(size: int, radius: int, device: torch.device, least: int = 1) -> torch.Tensor:
    """:func:`patchcore.core.maps.symmetric_indices`, also for a size known only when the graph runs
    (keep-aspect inputs): there by folding out-of-range indices back, as often as a size of at least
    ``least`` may need, without the modulo ONNX cannot take of a symbolic size."""
    if isinstance(size, int):
        return symmetric_indices(size, radius).to(device)
    i = torch.arange(-radius, size + radius, device=device)
    for _ in range(-(-radius // least) + 1):
        i = torch.where(i < 0, -i - 1, i)
        i = torch.where(i >= size, 2 * size - 1 - i, i)
    return i
