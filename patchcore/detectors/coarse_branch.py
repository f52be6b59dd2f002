"""A single-bank model's coarse bank: deeper layers of the same model inputs (optionally pooled), for the maps.

The fine bank (``layers`` at ``resize``, small patches) scores images best on small local defects, and its maps
find them; but what is large or spread out (an uneven region, a long thin crack, a frayed edge) raises many fine
patches a little and none much, and its extent is seen better by features of a deeper level (and, with
``coarse_pool`` 2, a coarser scale). The coarse bank is a plain PatchCore (:func:`coarse_config`) with
``coarse_layers`` on the model inputs average-pooled ``coarse_pool`` x ``coarse_pool``. On held-out good images
its map pixels are put onto the fine bank's scale (:func:`~patchcore.core.gaussian.robust_affine`: the
interquartile ranges matched and the upper tails anchored at the 90th percentile), and every pixel of the
model's map is the mean of the two: two levels' estimates of the same pixel, whose noise on good texture partly
cancels while a defect raises both. On textile's masked local defects that gave pixel AUROC 0.985 and PRO 0.955
against the fine map's 0.971 and 0.920 (the larger of the two instead of the mean: 0.981 and 0.943). The image
score stays the fine bank's (and the global branch's): the coarse bank's, as the larger of the two, cost 0.003
to 0.006 of image AUROC on textile (README "Accuracy"). Its maps are at the model input's size, like the fine
bank's, so tiles, keep-aspect inputs and the export take it as they take the fine bank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..backbones import backbone_spec
from ..config import PatchCoreConfig
from ..core.gaussian import robust_affine
from ..errors import PatchCoreError
from ..persistence import DetectorState
from ..persistence.model_file import SINGLE_KIND

logger = logging.getLogger(__name__)

#: The percentile of held-out good map pixels at which the coarse bank's meet the fine bank's, their
#: interquartile ranges matched: an upper one, where pixel thresholds lie.
ANCHOR = 90.0
#: The coarse bank keeps this many times fewer rows than the fine bank. Its deeper level is at stride 16 (four
#: cells of the stride-8 grid share each blocks.3 cell), so neighbouring rows are near-duplicates and fewer
#: cover them: on textile's masked local defects a quarter of the rows gave pixel AUROC 0.985 and PRO 0.955
#: against 0.986 and 0.958 with as many as the fine bank, for about a quarter of the search and of the coreset.
ROW_SHARE = 4
#: Map pixels taken from each held-out map for the map affine: every 4th row and column (maps are smooth).
PIXEL_STRIDE = 4
PREFIX = "coarse."


def coarse_config(config: PatchCoreConfig) -> PatchCoreConfig:
    """The plain PatchCore config of ``config``'s coarse bank: its inputs pooled ``coarse_pool`` x more,
    ``coarse_layers`` (None: the backbone's coarse defaults), :data:`ROW_SHARE` times fewer rows than the fine
    bank keeps, no branches and no thresholds of its own. Its image score averages as large a share of its
    patches as the fine bank's: a grid with ``coarse_pool`` squared times fewer patches takes that many fewer
    of its largest (at least 1)."""
    layers = config.coarse_layers or backbone_spec(config.backbone).coarse_layers or None
    assert config.image_top_k is not None  # resolved by the config
    pooled = config.coarse_pool**2  # a pooled grid has this many times fewer patches to keep rows of
    return config.replace(
        layers=layers,
        coreset_ratio=min(1.0, config.coreset_ratio * pooled / ROW_SHARE),
        coreset_size=None if config.coreset_size is None else max(1, config.coreset_size // ROW_SHARE),
        image_top_k=max(1, round(config.image_top_k / pooled)),
        input_pool=config.input_pool * config.coarse_pool,
        global_branch=False,
        coarse_branch=False,
        coarse_layers=None,
        coarse_pool=1,
        threshold_fpr=None,
        threshold=None,
        pixel_threshold=None,
    )


def wants_coarse_bank(config: PatchCoreConfig) -> bool:
    """Whether ``config`` asks for a coarse bank that is not the fine bank's twin: ``coarse_branch`` on, with
    other layers or a pooled input. A twin (a backbone without coarse defaults, or ``coarse_layers`` equal to
    ``layers``, at ``coarse_pool`` 1) would cost a second bank and add nothing: such a model has none."""
    if not config.coarse_branch:
        return False
    coarse = coarse_config(config)
    defaults = backbone_spec(config.backbone).default_layers
    return coarse.input_pool != config.input_pool or tuple(coarse.layers or defaults) != tuple(
        config.layers or defaults
    )


def _affine_or_none(value: Any, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    numbers = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    try:  # an integer past float's range is a number JSON allows and float() refuses
        offset, slope = (float(v) for v in value) if numbers else (np.nan, np.nan)
    except OverflowError:
        offset, slope = np.nan, np.nan
    if not (np.isfinite([offset, slope]).all() and slope > 0):
        raise PatchCoreError(f"the coarse bank's {what} {value!r} must be two finite numbers, the slope positive")
    return offset, slope


@dataclass(frozen=True)
class CoarseBranch:
    """``model``: the coarse bank (a fitted plain PatchCore); ``map_affine``: (offset, slope) of its map pixels
    onto the fine bank's (None until :meth:`calibrated`, e.g. in a shard)."""

    model: Any  # a PatchCore (not imported: patchcore.detectors.patchcore imports this module)
    map_affine: tuple[float, float] | None = None

    def calibrated(self, bank_maps: list[np.ndarray], coarse_maps: list[np.ndarray]) -> CoarseBranch | None:
        """With the affine that gives the held-out good inputs' coarse map pixels the fine maps' interquartile
        range and :data:`ANCHOR` percentile; None (logged) when they cannot be matched (too few, or all alike)."""
        try:
            maps = robust_affine(_pixels(bank_maps), _pixels(coarse_maps), ANCHOR)
        except ValueError as exc:
            logger.warning("the coarse bank cannot be calibrated (%s): fitted without it", exc)
            return None
        if not maps[1] > 0:
            logger.warning("the held-out images' fine maps do not vary: fitted without the coarse bank")
            return None
        return replace(self, map_affine=maps)

    def combined_map(self, amap: np.ndarray, coarse_map: np.ndarray) -> np.ndarray:
        """(H, W) maps of one input -> per pixel the mean of the fine map and the coarse map on its scale."""
        if self.map_affine is None:
            raise PatchCoreError("the coarse bank's maps are not calibrated: fit the model on all its images")
        offset, slope = self.map_affine
        return ((amap + (offset + slope * coarse_map)) / 2).astype(amap.dtype)

    # ------------------------------------------------------------------ state
    def meta(self) -> dict[str, Any]:
        """The ``coarse`` header: the coarse model's own header and the map affine."""
        state = self.model.get_state()
        return {"model": state.meta, "map_affine": None if self.map_affine is None else list(self.map_affine)}

    def tensors(self) -> dict[str, np.ndarray]:
        return {PREFIX + name: value for name, value in self.model.get_state().tensors.items()}

    @staticmethod
    def shard_state(state: DetectorState) -> DetectorState:
        """The coarse bank's own state inside a model's ``state`` (its ``coarse`` header's model and the
        ``coarse.*`` tensors)."""
        meta = state.meta.get("coarse")
        if not isinstance(meta, dict) or set(meta) != {"model", "map_affine"}:
            raise PatchCoreError("the coarse bank's header must hold model and map_affine")
        if not isinstance(meta["model"], dict) or "coarse" in meta["model"]:
            # checked before the coarse bank is loaded: a file nesting coarse banks would load each in turn
            raise PatchCoreError("the coarse bank's header must be a model's header without a coarse bank of its own")
        own = {name[len(PREFIX) :]: value for name, value in state.tensors.items() if name.startswith(PREFIX)}
        return DetectorState(SINGLE_KIND, meta["model"], own, state.provenance)

    @classmethod
    def from_state(cls, meta: Any, model: Any, config: PatchCoreConfig) -> CoarseBranch:
        """The coarse bank of a model file: its ``coarse`` header and its own ``model`` (loaded from
        :meth:`shard_state`), checked against the coarse config that the model's ``config`` implies."""
        if model.config.replace(weights=None) != coarse_config(config).replace(weights=None):
            raise PatchCoreError("the coarse bank's settings do not match the model's")
        return cls(model, _affine_or_none(meta["map_affine"], "map affine"))


def _pixels(maps: list[np.ndarray]) -> np.ndarray:
    """Every :data:`PIXEL_STRIDE`-th row and column of each map, as one 1-d array."""
    return np.concatenate([np.asarray(m)[::PIXEL_STRIDE, ::PIXEL_STRIDE].ravel() for m in maps])
