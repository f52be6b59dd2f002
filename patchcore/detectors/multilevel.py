"""Multi-level, multi-scale PatchCore: several banks (layer sets x input sizes) and an optional image-level
Gaussian branch, each standardised by held-out good images, combined into one score and one map.

One config describes it (:class:`~patchcore.config.PatchCoreConfig` with ``level_sets``, ``scales``,
``global_layers`` and ``combine``): the members are ``layers`` and every ``level_sets`` entry, each at
``resize`` and at every ``scales`` entry. It is an ensemble (:class:`PatchCoreEnsemble`: the seeded
``calibration_share`` of the good images never enters a bank and gives every part's mean and standard
deviation) whose members may differ in layers and input size, whose maps are resampled onto the first
member's, and which may add the global branch:

* global branch: per image the mean over positions of each ``global_layers`` feature map of the image
  resized to a ``global_resize`` square, concatenated;
  a Gaussian (Ledoit-Wolf shrunk, :mod:`patchcore.core.gaussian`) of the bank images' vectors; the score is
  the Mahalanobis distance. It sees global texture changes that raise many patches only a little. It has
  no map.
* combine: "max" (the default) flags an image when any part finds it unusual, which keeps each part's
  strength (local defects for the banks, global changes for the branch); "mean" averages, like
  :class:`PatchCoreEnsemble`. Maps are combined the same way over the members.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone
from ..config import MULTILEVEL_FIELDS, PatchCoreConfig
from ..core.gaussian import Gaussian, fit_gaussian, mahalanobis
from ..errors import PatchCoreError
from ..imaging import DEFAULT_MAX_PIXELS, ImageLike, load_image, preprocess
from ..persistence import DetectorState
from .base import RUNTIME, Inference, check_keys, header_dict, not_fitted
from .ensemble import PatchCoreEnsemble
from .patchcore import PatchCore, checked_device

logger = logging.getLogger(__name__)

MULTILEVEL_KIND = "patchcore-multilevel"
THRESHOLD_FIELDS = ("threshold_fpr", "threshold", "pixel_threshold")


def member_configs(config: PatchCoreConfig) -> list[PatchCoreConfig]:
    """The banks of a multi-level config: (``layers`` and each ``level_sets`` entry) x (``resize`` and each
    ``scales`` entry), in that order, as plain PatchCore configs (no thresholds, no multi-level fields)."""
    plain = config.replace(
        **dict.fromkeys((*MULTILEVEL_FIELDS, *THRESHOLD_FIELDS)),
        global_resize=PatchCoreConfig.global_resize,
        global_branch=False,  # the multi-level model's image-level branch is its own (global_layers)
        coarse_branch=False,  # and its scales are its own (scales)
    )
    layer_sets: list[tuple[str, ...] | None] = [config.layers]
    layer_sets += [tuple(entry.split("+")) for entry in config.level_sets or ()]
    sizes = [config.resize, *(config.scales or ())]
    members = []
    for size in sizes:
        crop = None if config.crop is None else max(16, round(config.crop * size / config.resize))
        for layers in layer_sets:
            members.append(plain.replace(layers=layers, resize=size, crop=crop))
    return members


class MultiLevelPatchCore(PatchCoreEnsemble):
    """``MultiLevelPatchCore(PatchCoreConfig(level_sets=("blocks.2",), global_layers=("blocks.2",)))``.

    Learned state, beside :class:`PatchCoreEnsemble`'s (``models_``, ``score_stats_``, ``pixel_stats_``, ...):
    ``gaussian_`` (the global branch's :class:`~patchcore.core.gaussian.Gaussian`, None without one),
    ``global_stats_`` ((2,) mean and standard deviation of its scores on the held-out images) and
    ``global_backbone_``.
    """

    kind = MULTILEVEL_KIND

    def __init__(
        self,
        config: PatchCoreConfig | None = None,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        search: str = "exact",
        progress: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **settings: Any,
    ) -> None:
        self.config = (config or PatchCoreConfig()).replace(**settings)
        cfg = self.config
        super().__init__(
            member_configs(cfg),
            calibration_share=cfg.calibration_share,
            seed=cfg.seed,
            threshold_fpr=cfg.threshold_fpr,
            threshold=cfg.threshold,
            pixel_threshold=cfg.pixel_threshold,
            device=device,
            batch_size=batch_size,
            chunk_size=chunk_size,
            search=search,
            progress=progress,
            max_pixels=max_pixels,
        )

    # ------------------------------------------------------------------ scikit-learn parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return {**fields, **{name: getattr(self, name) for name in RUNTIME}}

    def set_params(self, **params: Any) -> MultiLevelPatchCore:
        fields = set(self.config.to_dict())
        unknown = sorted(set(params) - fields - set(RUNTIME))
        if unknown:
            raise ValueError(f"invalid parameter(s) {', '.join(unknown)} for MultiLevelPatchCore")
        config = self.config.replace(**{k: v for k, v in params.items() if k in fields})
        self.__init__(config, **{name: params.get(name, getattr(self, name)) for name in RUNTIME})  # type: ignore[misc]
        return self

    # ------------------------------------------------------------------ fitting
    def _check_settings(self) -> None:
        for name, value in (("threshold", self.threshold), ("pixel_threshold", self.pixel_threshold)):
            if value is not None and not np.isfinite(value):
                raise PatchCoreError(f"{name}={value} must be a finite number (standard deviations)")
        if self.config.tile_size is not None:
            raise PatchCoreError("a multi-level model does not tile yet: drop tile_size, or the multi-level settings")
        self.resolved_batch_size()

    def fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> MultiLevelPatchCore:
        """Fit every bank and the global branch on the good images minus the held-out calibration share, then
        standardise every part on the held-out images. Returns self."""
        train, calibration = self.calibration_split(images)
        if not calibration:
            raise PatchCoreError("a multi-level model needs held-out good images: give at least 2 training images")
        started = time.perf_counter()
        self.models_ = [PatchCore(config, **self._runtime()).fit(train, root=root) for config in self.members]
        self._fit_global(train)
        self._standardize(len(train), calibration)
        self.fit_stats_ = {**self._summed_stats(), "fit_seconds": time.perf_counter() - started}
        logger.info(
            "multi-level model: %d bank(s)%s, combined by %s",
            len(self.models_),
            f" and a global branch on {', '.join(self.config.global_layers or ())}" if self.gaussian_ else "",
            self.config.combine,
        )
        return self

    def _fit_global(self, images: Sequence[ImageLike]) -> None:
        layers = self.config.global_layers
        self.gaussian_: Gaussian | None = None
        self.global_backbone_: Backbone | None = None
        if layers is None:
            return
        self.global_backbone_ = create_backbone(self.config.backbone, layers, self.config.weights).to(
            checked_device(self.device)
        )
        self.gaussian_ = fit_gaussian(self._pooled(images))

    def fit_shard(self, images: Sequence[ImageLike], n_shards: int) -> list[bytes]:
        raise PatchCoreError("a multi-level model fits on this machine only: drop --engine ray")

    def partial_fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> MultiLevelPatchCore:
        """Add good images to every bank (:meth:`PatchCore.partial_fit`); the global branch and the
        standardisation are kept (refit to include the new images in them). Returns self."""
        if getattr(self, "gaussian_", None) is not None:
            logger.warning("partial_fit keeps the global branch's Gaussian as fitted; refit to include new images")
        super().partial_fit(images, root=root)
        return self

    def _standardize(self, n_train: int, calibration: list[ImageLike]) -> None:
        self.global_stats_ = np.array([0.0, 1.0])
        if self.gaussian_ is not None:
            scores = self._global_scores(calibration)
            self.global_stats_ = np.array([scores.mean(), scores.std() or 1.0])
        super()._standardize(n_train, calibration)

    # ------------------------------------------------------------------ the global branch
    def _pooled(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, D) float64: per image the mean of each global layer's feature map over its positions."""
        assert self.global_backbone_ is not None
        backbone, cfg = self.global_backbone_, self.config
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalization == "imagenet" else (backbone.mean, backbone.std)
        rows = []
        size = self.resolved_batch_size()
        images = list(images)
        for start in range(0, len(images), size):
            tensors = [
                preprocess(load_image(image, self.max_pixels), cfg.global_resize, None, mean, std)[0]
                for image in images[start : start + size]
            ]
            with torch.inference_mode():
                maps = backbone(torch.stack(tensors).to(self.device))
            rows.append(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1).cpu().double().numpy())
        return np.concatenate(rows)

    def _global_scores(self, images: Sequence[ImageLike]) -> np.ndarray:
        assert self.gaussian_ is not None
        return mahalanobis(self._pooled(images), self.gaussian_)

    # ------------------------------------------------------------------ inference
    def infer(self, images: Sequence[ImageLike], *, maps: bool = True) -> Iterator[Inference]:
        """Per image: the combined standard score and map (the first bank's input resolution), and its geometry."""
        self._check_fitted()
        images = list(images)
        reduce = np.max if self.config.combine == "max" else np.mean
        size = self.resolved_batch_size()
        for start in range(0, len(images), size):
            chunk = [load_image(image, self.max_pixels) for image in images[start : start + size]]
            outputs = [list(model.infer(chunk, maps=maps)) for model in self.models_]
            extra = None
            if self.gaussian_ is not None:
                extra = (self._global_scores(chunk) - self.global_stats_[0]) / self.global_stats_[1]
            for i in range(len(chunk)):
                parts = [(out[i].score - mu) / sd for out, (mu, sd) in zip(outputs, self.score_stats_)]
                if extra is not None:
                    parts.append(extra[i])
                amap = None
                if maps:
                    shape = outputs[0][i].map().shape
                    standard = [
                        _resized((out[i].map() - mu) / sd, shape) for out, (mu, sd) in zip(outputs, self.pixel_stats_)
                    ]
                    amap = reduce(standard, axis=0).astype(np.float32)
                yield Inference(float(reduce(parts)), amap, outputs[0][i].geometry)

    def describe(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _check_fitted(self) -> None:
        if not hasattr(self, "global_stats_"):
            raise not_fitted("MultiLevelPatchCore")

    # ------------------------------------------------------------------ state
    def get_state(self) -> DetectorState:
        state = super().get_state()
        meta = dict(state.meta)
        meta["multilevel"] = {
            "config": self.config.to_dict(),
            "global_stats": self.global_stats_.tolist(),
            "global_weights_sha256": None if self.global_backbone_ is None else self.global_backbone_.weights_sha256,
            "global_shrinkage": None if self.gaussian_ is None else self.gaussian_.shrinkage,
        }
        tensors = dict(state.tensors)
        if self.gaussian_ is not None:
            for name in ("mean", "scale", "precision"):
                tensors[f"global.{name}"] = np.asarray(getattr(self.gaussian_, name), dtype=np.float64)
        return DetectorState(self.kind, meta, tensors)

    @classmethod
    def from_state(cls, state: DetectorState, *, source: Any = "state", **runtime: Any) -> MultiLevelPatchCore:
        meta = dict(state.meta)
        try:
            info = header_dict(meta, "multilevel")
            check_keys(info, {"config", "global_stats", "global_weights_sha256", "global_shrinkage"}, "multilevel")
            config = PatchCoreConfig.from_dict(header_dict(info, "config"))
            global_stats = np.array(info["global_stats"], dtype=np.float64)
            digest, shrinkage = info["global_weights_sha256"], info["global_shrinkage"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PatchCoreError(
                f"{source}: the multi-level header is incomplete or malformed ({exc!r}); refit or restore it"
            ) from exc
        except PatchCoreError as exc:
            raise PatchCoreError(f"{source}: invalid multi-level settings in the model file ({exc})") from exc
        if global_stats.shape != (2,) or not np.isfinite(global_stats).all():
            raise PatchCoreError(f"{source}: the global branch's statistics must be two finite numbers")
        del meta["multilevel"]
        members = {k: v for k, v in state.tensors.items() if not k.startswith("global.")}
        ensemble = PatchCoreEnsemble.from_state(
            DetectorState(state.kind, meta, members, state.provenance), source=source, **runtime
        )
        model = cls(config, **runtime)
        if [m.config.replace(weights=None) for m in ensemble.models_] != [
            c.replace(weights=None) for c in member_configs(config)
        ]:
            raise PatchCoreError(f"{source}: the banks do not match the multi-level config: refit the model")
        for name in ("models_", "score_stats_", "pixel_stats_", "n_train_", "n_calibration_", "fit_stats_"):
            setattr(model, name, getattr(ensemble, name))
        model.thresholds_ = ensemble.thresholds_
        model.provenance_ = ensemble.provenance_
        model.global_stats_ = global_stats
        model.gaussian_, model.global_backbone_ = None, None
        if config.global_layers is not None:
            try:
                mean, scale, precision = (
                    np.asarray(state.tensors[f"global.{n}"]) for n in ("mean", "scale", "precision")
                )
            except KeyError as exc:
                raise PatchCoreError(f"{source}: the global branch's tensors are missing ({exc}): refit") from exc
            dim = mean.shape[0] if mean.ndim == 1 else -1
            if (
                scale.shape != (dim,)
                or precision.shape != (dim, dim)
                or not all(np.isfinite(a).all() for a in (mean, scale, precision))
            ):
                raise PatchCoreError(f"{source}: the global branch's tensors are mis-shaped or not finite: refit")
            backbone = create_backbone(config.backbone, config.global_layers, config.weights).to(
                checked_device(model.device)
            )
            if backbone.weights_sha256 != digest:
                raise PatchCoreError(
                    f"{source}: the backbone weights here differ from those the global branch was fitted with: "
                    "pass the original weights file, or refit"
                )
            if sum(info.channels for info in backbone.feature_info) != dim:
                raise PatchCoreError(
                    f"{source}: the global branch has {dim} dimensions, its layers give another number"
                )
            model.global_backbone_ = backbone
            model.gaussian_ = Gaussian(mean, scale, precision, float(shrinkage or 0.0))
        return model


def _resized(amap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(h, w) map -> ``shape`` (H, W), bilinearly (a member at another input size onto the first member's map)."""
    if amap.shape == tuple(shape):
        return amap
    tensor = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()
