"""The settings of a PatchCore model: one frozen dataclass, saved inside every model file.

Command-line flags map one to one onto these fields (``--coreset-ratio`` -> ``coreset_ratio``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core.scoring_modes import DEFAULT_SCORING, SCORING_MODES, scoring_rule
from .core.two_level import EXACT_ROWS
from .errors import PatchCoreError

CORESET_METHODS = ("greedy", "random")
NORMALIZATIONS = ("backbone", "imagenet")
COMBINES = ("max", "mean")
# the settings that fix the input geometry: given any of them, auto_geometry leaves the geometry alone
GEOMETRY_FIELDS = ("resize", "crop", "keep_aspect", "tile_size")
# the settings that make a multi-level model (patchcore.detectors.multilevel); a plain PatchCore has them off
MULTILEVEL_FIELDS = ("level_sets", "scales", "global_layers")
# the list-valued settings (tuples in the config, lists in a model file's JSON header)
LAYER_LISTS = ("layers", "coarse_layers", *MULTILEVEL_FIELDS)


@dataclass(frozen=True)
class PatchCoreConfig:
    """Every setting that changes what a model computes.

    Defaults were chosen by measurement on the textile protocol (README, "Choosing the defaults"):
    EfficientNet-Lite0 blocks.2 + blocks.3 at 384 px, a 1% coreset and the mean of the 20 largest patch
    scores, reweighted by eq. 7 (``scoring="mean-top-k"``).

    backbone, layers, weights: feature extractor (see ``patchcore.backbones``); layers None = its defaults.
    normalization: "backbone" feeds the backbone the statistics it was trained with (the right thing);
        "imagenet" forces ImageNet mean/std (what peer tools do for every backbone; for comparisons).
    resize, crop: images are resized to resize x resize, then center-cropped to crop x crop (None: no crop).
    keep_aspect: resize so that the shorter side equals resize, keeping the aspect ratio, then center-crop
        to crop x crop; without crop the input stays non-square (each image at its own aspect).
    tile_size, tile_overlap, tile_scale: tiling for high-resolution images: the image (scaled by tile_scale,
        1.0 = original pixels) is cut into overlapping tile_size x tile_size tiles (neighbours overlap by
        at least tile_overlap of a tile), each tile is resized/cropped like an image and scored on its
        own; the image score is the maximum over its tiles, the map is stitched (mean in overlaps) at the
        scaled image's resolution. In fit, every tile's patches enter the bank. None: no tiling.
    patch_size: p of the p x p neighbourhood averaged around each feature position.
    target_dim: None keeps every channel of every level (concatenated); an int reduces each level and then
        the stack to that many dimensions by adaptive average pooling, like the official code (1024).
    coreset_method, coreset_ratio, coreset_size, projection_dim: memory-bank subsampling; an absolute
        coreset_size wins over coreset_ratio.
    exact_coreset_rows: the greedy coreset is exact (the whole bank at once) for banks of up to this many patch
        features; a larger bank is reduced as it streams in by a two-level greedy (shards of 4096 rows, each to
        twice its share of the coreset, then the exact greedy over their union: time linear in the training set,
        memory flat; ``patchcore.core.two_level``). None: always the exact greedy, every feature in memory at once.
    max_bank_memory: MiB allowed for the patch-feature bank during fit; None: see exact_coreset_rows.
        When set, the bank is reduced by greedy coresets in shards as it grows, then once more over the
        union, so training sets far larger than memory fit (at a small, measured coverage cost).
    scoring: a mode of ``patchcore.core.scoring_modes.SCORING_RULES``: "mean-top-k" (the default: L2 distance,
        image score = mean of the image_top_k largest patch scores reweighted by eq. 7 over num_neighbors
        bank neighbours), "paper" (exactly the paper: L2, max patch score, eq. 7) or "official" (exactly
        the official code: squared L2, patch score = mean over the k nearest, image score = max).
    image_top_k: the image score is the mean of this many largest patch scores (1 = the max). None takes
        the mode's own: 20 for "mean-top-k", 1 for "paper" and "official"; the stored config holds the
        resolved number. "paper" and "official" are exactly the paper and the official code at their own
        top-k; another value makes them variants (mean of the top k instead of the max).
    sigma: Gaussian smoothing of anomaly maps, in pixels of the model input.
    seed: seeds every random choice (projection, coreset start, random coreset, calibration split).
    threshold_fpr: when set, fit holds out calibration_share of the good training images (they never enter
        the bank) and sets the image threshold so that this fraction of them would be flagged, and the
        pixel threshold likewise over their anomaly-map pixels.
    threshold, pixel_threshold: thresholds given by hand (they win over threshold_fpr).
    global_branch: an image-level branch beside the bank (a single-bank model's; a multi-level model has
        global_layers instead): a Gaussian (Ledoit-Wolf shrunk) of every training input's mean patch feature,
        whose Mahalanobis distance catches global texture changes that raise every patch a little and none
        much. fit holds out calibration_share of the good images, on which the distance is put onto the
        bank's score scale (equal quartiles); the image score is the larger of the two.
        It costs no backbone work (the bank's own features, averaged). Off: the bank alone, the paper's method.
    coarse_branch, coarse_layers, coarse_pool: a second bank of a deeper feature level for the anomaly maps (a
        single-bank model's): features of coarse_layers (None: the backbone's coarse defaults, for
        EfficientNet-Lite0 blocks.2 + blocks.3; a backbone without them gets no coarse bank) of the same model
        inputs, average-pooled coarse_pool x coarse_pool first (1, the default: the same scale; 2: half the
        resolution), its own coreset of a quarter as many rows as the bank's. On the held-out calibration_share
        its map pixels are put onto the bank's (interquartile ranges matched, upper tails anchored at the 90th
        percentile), and every map pixel is the mean of the two; the image score stays the bank's. Off: the
        bank's maps alone.
    input_pool: the model input is average-pooled by this factor before the backbone (1: not at all; 2: features
        of half the input's resolution); maps stay at the input's size. The coarse bank is a model with
        input_pool x coarse_pool.
    level_sets, scales, global_layers, combine: a multi-level model (``MultiLevelPatchCore``; all None: a plain
        PatchCore). level_sets: more layer sets, each "+"-joined (e.g. "blocks.2" or "blocks.2+blocks.4"), one
        bank each beside ``layers``; scales: more input sizes (resize), each with every layer set; global_layers:
        an image-level branch, a Gaussian of the images' mean features of these layers (for global texture
        changes that raise every patch a little), computed on a global_resize square (128: the mean feature
        needs no fine detail; on textile 128 and 384 px gave the same AUROC at a ninth of the cost). Each
        part's scores are standardised by held-out good images (calibration_share) and combined by
        ``combine`` ("max" or "mean" of the standard scores).
    auto_geometry: the command line's fit, evaluate and tune choose resize (and a square input) from the
        training images' sizes and aspects (:func:`patchcore.imaging.auto_geometry.choose_geometry`) unless
        resize, crop, keep_aspect or tile_size is given; in Python, ``adapt_geometry(config, images)`` does the
        same. geometry_reason: what was chosen and why (None: the geometry was fixed); stored, not a flag.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    weights: str | None = None
    normalization: str = "backbone"
    resize: int = 384
    crop: int | None = None
    keep_aspect: bool = False
    tile_size: int | None = None
    tile_overlap: float = 0.25
    tile_scale: float = 1.0
    patch_size: int = 3
    target_dim: int | None = None
    coreset_method: str = "greedy"
    coreset_ratio: float = 0.01
    coreset_size: int | None = None
    projection_dim: int = 128
    exact_coreset_rows: int | None = EXACT_ROWS
    max_bank_memory: int | None = None
    scoring: str = DEFAULT_SCORING
    num_neighbors: int = 9
    k: int = 1
    image_top_k: int | None = None
    sigma: float = 4.0
    seed: int = 0
    threshold_fpr: float | None = None
    calibration_share: float = 0.2
    threshold: float | None = None
    pixel_threshold: float | None = None
    global_branch: bool = True
    coarse_branch: bool = True
    coarse_layers: tuple[str, ...] | None = None
    coarse_pool: int = 1
    input_pool: int = 1
    level_sets: tuple[str, ...] | None = None
    scales: tuple[int, ...] | None = None
    global_layers: tuple[str, ...] | None = None
    global_resize: int = 128
    combine: str = "max"
    auto_geometry: bool = True
    geometry_reason: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        for name in LAYER_LISTS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _one_of("combine", self.combine, COMBINES)
        for level_set in self.level_sets or ():
            if not all(level_set.split("+")):
                raise PatchCoreError(
                    f"level_sets entry {level_set!r} must be layer names joined by +, e.g. blocks.2+blocks.3"
                )
        if self.global_resize < 16:
            raise PatchCoreError(f"global_resize={self.global_resize} is too small: use at least 16 pixels")
        for scale in self.scales or ():
            if scale < 16:
                raise PatchCoreError(f"scales entry {scale} is too small: use at least 16 pixels")
        _one_of("scoring", self.scoring, SCORING_MODES)
        _one_of("coreset_method", self.coreset_method, CORESET_METHODS)
        _one_of("normalization", self.normalization, NORMALIZATIONS)
        if self.resize < 16:
            raise PatchCoreError(f"resize={self.resize} is too small: use at least 16 pixels")
        if self.crop is not None and not 16 <= self.crop <= self.resize:
            raise PatchCoreError(f"crop={self.crop} must lie between 16 and resize={self.resize}")
        if self.tile_size is not None and self.tile_size < 16:
            raise PatchCoreError(f"tile_size={self.tile_size} is too small: use at least 16 pixels, or none")
        if not 0 <= self.tile_overlap < 1:
            raise PatchCoreError(f"tile_overlap={self.tile_overlap} must lie in [0, 1), e.g. 0.25 for a quarter tile")
        if not 0 < self.tile_scale <= 16:
            raise PatchCoreError(
                f"tile_scale={self.tile_scale} must lie in (0, 16], e.g. 0.5 to tile a half-size image"
            )
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise PatchCoreError(f"patch_size={self.patch_size} must be a positive odd number (paper: 3)")
        if self.target_dim is not None and self.target_dim < 1:
            raise PatchCoreError("target_dim must be a positive number of dimensions, or None")
        if not 0 < self.coreset_ratio <= 1:
            raise PatchCoreError(f"coreset_ratio={self.coreset_ratio} must lie in (0, 1], e.g. 0.1 for 10%")
        if self.coreset_size is not None and self.coreset_size < 1:
            raise PatchCoreError("coreset_size must be at least 1")
        if self.exact_coreset_rows is not None and self.exact_coreset_rows < 0:
            raise PatchCoreError(
                f"exact_coreset_rows={self.exact_coreset_rows} must be at least 0 (patch features), or none"
            )
        if self.max_bank_memory is not None and self.max_bank_memory < 1:
            raise PatchCoreError("max_bank_memory is in MiB and must be at least 1")
        if self.projection_dim < 1:
            raise PatchCoreError("projection_dim must be at least 1 (paper: 128)")
        top_k = scoring_rule(self.scoring).default_top_k if self.image_top_k is None else self.image_top_k
        object.__setattr__(self, "image_top_k", top_k)
        if self.num_neighbors < 1 or self.k < 1 or top_k < 1:
            raise PatchCoreError("num_neighbors, k and image_top_k must be at least 1")
        if self.threshold_fpr is not None and not 0 < self.threshold_fpr < 1:
            raise PatchCoreError(f"threshold_fpr={self.threshold_fpr} must lie in (0, 1), e.g. 0.05")
        if not 0 < self.calibration_share < 1:
            raise PatchCoreError(f"calibration_share={self.calibration_share} must lie in (0, 1), e.g. 0.2")
        for name in ("threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PatchCoreError(f"{name}={value} must be positive (scores are distances)")
        if not 1 <= self.input_pool <= self.input_size // 16:
            raise PatchCoreError(
                f"input_pool={self.input_pool} must lie between 1 and the input size / 16 ({self.input_size // 16})"
            )
        if self.coarse_branch and not 1 <= self.input_pool * self.coarse_pool <= self.input_size // 16:
            raise PatchCoreError(
                f"coarse_pool={self.coarse_pool} must lie between 1 and the input size / 16 / input_pool "
                f"({self.input_size // 16 // self.input_pool}), or turn the coarse bank off (--no-coarse-branch)"
            )
        if self.sigma < 0:
            raise PatchCoreError("sigma must be >= 0 (0 disables smoothing)")
        if self.seed < 0:
            raise PatchCoreError(f"seed={self.seed} must be a non-negative whole number")

    @property
    def multilevel(self) -> bool:
        """True when the settings ask for a multi-level model (more layer sets, scales or a global branch)."""
        return any(getattr(self, name) is not None for name in MULTILEVEL_FIELDS)

    @property
    def input_size(self) -> int:
        """Side of the square the backbone sees."""
        return self.crop if self.crop is not None else self.resize

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """A copy with ``changes`` applied and validated. A new ``scoring`` without an ``image_top_k`` takes the
        new mode's own top-k (``dataclasses.replace`` would keep the old mode's resolved number)."""
        if "scoring" in changes and "image_top_k" not in changes:
            changes["image_top_k"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in LAYER_LISTS:
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PatchCoreError(
                f"unknown setting(s) {', '.join(unknown)}: known settings are {', '.join(sorted(known))}"
            )
        return cls(**data)


# Every setting's kind and, for numbers, the largest sane value (bounds below are checked field by field in
# __post_init__). A value of another type, a non-finite float or one past its bound is refused with the
# field's name, whether it comes from a flag, a config file or a model file's header.
_LIMITS: dict[str, tuple[str, float | None]] = {
    "backbone": ("str", None),
    "layers": ("layers", None),
    "weights": ("str", None),
    "normalization": ("str", None),
    "resize": ("int", 8192),
    "crop": ("int", 8192),
    "keep_aspect": ("bool", None),
    "tile_size": ("int", 65536),
    "tile_overlap": ("float", None),
    "tile_scale": ("float", None),
    "patch_size": ("int", 63),
    "target_dim": ("int", 65536),
    "coreset_method": ("str", None),
    "coreset_ratio": ("float", None),
    "coreset_size": ("int", 2**31 - 1),
    "projection_dim": ("int", 4096),
    "exact_coreset_rows": ("int", 2**40),
    "max_bank_memory": ("int", 2**24),
    "scoring": ("str", None),
    "num_neighbors": ("int", 1024),
    "k": ("int", 1024),
    "image_top_k": ("int", 2**20),
    "sigma": ("float", 256.0),
    "seed": ("int", 2**32 - 1),
    "threshold_fpr": ("float", None),
    "calibration_share": ("float", None),
    "threshold": ("float", None),
    "pixel_threshold": ("float", None),
    "global_branch": ("bool", None),
    "coarse_branch": ("bool", None),
    "coarse_layers": ("layers", None),
    "coarse_pool": ("int", 64),
    "input_pool": ("int", 64),
    "level_sets": ("layers", None),
    "scales": ("ints", 8192),
    "global_layers": ("layers", None),
    "global_resize": ("int", 8192),
    "combine": ("str", None),
    "auto_geometry": ("bool", None),
    "geometry_reason": ("str", None),
}
_KIND_WORDS = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false"}


def _check_types(config: PatchCoreConfig) -> None:
    """Refuse values of the wrong type, non-finite numbers and numbers past their field's sane maximum."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kind, high = _LIMITS[field.name]
        if value is None and "None" in str(field.type):  # the field may be None (its type says so)
            continue
        if kind == "layers":
            name = field.name
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise PatchCoreError(f"{name}={value!r} must be a list of layer names, e.g. blocks.2 blocks.3")
            if not all(isinstance(layer, str) and layer for layer in value):
                raise PatchCoreError(f"{name}={list(value)!r} must hold layer names (strings), e.g. blocks.2")
            continue
        if kind == "ints":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise PatchCoreError(f"{field.name}={value!r} must be a list of whole numbers, e.g. 256 384")
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in value):
                raise PatchCoreError(f"{field.name}={list(value)!r} must hold whole numbers, e.g. 256")
            if high is not None and max(value) > high:
                raise PatchCoreError(f"{field.name}={list(value)!r} is too large: at most {high:g}")
            plain_ints = tuple(int(v) for v in value)
            if not isinstance(value, tuple) or any(type(v) is not int for v in value):  # keep a tuple of ints as given
                object.__setattr__(config, field.name, plain_ints)
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        fits = {
            "str": isinstance(value, str),
            "bool": isinstance(value, (bool, np.bool_)),
            "int": number and isinstance(value, numbers.Integral),
            "float": number,
        }[kind]
        if not fits:
            raise PatchCoreError(f"{field.name}={value!r} must be {_KIND_WORDS[kind]}")
        try:
            finite = kind != "float" or math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise PatchCoreError(f"{field.name}={str(value)[:20]} must be a finite number")
        plain = {"bool": bool, "int": int, "float": float}.get(kind)
        if plain is not None and type(value) not in (plain, int):  # numpy scalars become plain Python values
            object.__setattr__(config, field.name, plain(value))
        if high is not None and value > high:
            raise PatchCoreError(f"{field.name}={str(value)[:20]} is too large: at most {high:g}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PatchCoreError(f"{name}={value!r} is not one of {', '.join(allowed)}")
