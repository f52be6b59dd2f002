"""A single-bank model's coarse bank: deeper layers of the same model inputs (optionally pooled), its own bank.

The fine bank (``layers`` at ``resize``, small patches) finds small local defects; what is large or spread out
(an uneven region, a long thin crack, a frayed edge) raises many fine patches a little and none much, and is
seen better by features of a deeper level (and, with ``coarse_pool`` 2, a coarser scale). The coarse bank is a
plain PatchCore (:func:`coarse_config`) with ``coarse_layers`` on the model inputs average-pooled
``coarse_pool`` x ``coarse_pool``; on held-out good images its image scores and its map pixels are put onto the
fine bank's scale (:func:`~patchcore.core.gaussian.robust_affine`: the interquartile ranges matched and the
upper tails anchored at the 90th percentile). The model's image score is the larger of the two; every map
pixel is their mean: two levels' estimates of the same pixel, whose noise on good texture partly cancels
while a defect raises both (on textile's masked local defects the mean gave pixel AUROC 0.986 and PRO 0.958,
the larger 0.984 and 0.949, the fine map alone 0.971 and 0.920; README "Accuracy"). Its maps are at the model
input's size, like the fine bank's, so tiles, keep-aspect inputs and the export take it as they take the fine
bank.
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

#: The percentile of held-out good images at which the coarse bank's scores (and map pixels) meet the fine
#: bank's, their interquartile ranges matched: an upper one, since the larger of the two image scores decides
#: (on textile 90 cost the fine bank's accuracy less than the quartiles).
ANCHOR = 90.0
#: Map pixels taken from each held-out map for the map affine: every 4th row and column (maps are smooth).
PIXEL_STRIDE = 4
PREFIX = "coarse."


def coarse_config(config: PatchCoreConfig) -> PatchCoreConfig:
    """The plain PatchCore config of ``config``'s coarse bank: its inputs pooled ``coarse_pool`` x more,
    ``coarse_layers`` (None: the backbone's coarse defaults), no branches and no thresholds of its own. Its
    image score averages as large a share of its patches as the fine bank's: a grid with ``coarse_pool``
    squared times fewer patches takes that many fewer of its largest (at least 1)."""
    layers = config.coarse_layers or backbone_spec(config.backbone).coarse_layers or None
    assert config.image_top_k is not None  # resolved by the config
    return config.replace(
        layers=layers,
        image_top_k=max(1, round(config.image_top_k / config.coarse_pool**2)),
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
    """``model``: the coarse bank (a fitted plain PatchCore); ``score_affine`` and ``map_affine``: (offset, slope)
    of its image scores and map pixels onto the fine bank's (None until :meth:`calibrated`, e.g. in a shard)."""

    model: Any  # a PatchCore (not imported: patchcore.detectors.patchcore imports this module)
    score_affine: tuple[float, float] | None = None
    map_affine: tuple[float, float] | None = None

    def calibrated(
        self,
        bank_scores: np.ndarray,
        bank_maps: list[np.ndarray],
        coarse_scores: np.ndarray,
        coarse_maps: list[np.ndarray],
    ) -> CoarseBranch | None:
        """With the affines that give the held-out good inputs' coarse scores (and map pixels) the fine bank's
        interquartile range and :data:`ANCHOR` percentile; None (logged) when they cannot be matched (too few, or
        all alike)."""
        try:
            scores = robust_affine(bank_scores, coarse_scores, ANCHOR)
            maps = robust_affine(_pixels(bank_maps), _pixels(coarse_maps), ANCHOR) if bank_maps else None
        except ValueError as exc:
            logger.warning("the coarse bank cannot be calibrated (%s): fitted without it", exc)
            return None
        if not scores[1] > 0 or (maps is not None and not maps[1] > 0):
            logger.warning("the held-out images' fine scores do not vary: fitted without the coarse bank")
            return None
        return replace(self, score_affine=scores, map_affine=maps)

    def combined(self, score: float, coarse_score: float) -> float:
        """An input's image score: the larger of the fine bank's and the coarse bank's on the fine scale."""
        if self.score_affine is None:
            raise PatchCoreError("the coarse bank is not calibrated: fit the model on all its images")
        offset, slope = self.score_affine
        return max(score, offset + slope * coarse_score)

    def combined_map(self, amap: np.ndarray, coarse_map: np.ndarray) -> np.ndarray:
        """(H, W) maps of one input -> per pixel the mean of the fine map and the coarse map on its scale."""
        if self.map_affine is None:
            raise PatchCoreError("the coarse bank's maps are not calibrated: fit the model on all its images")
        offset, slope = self.map_affine
        return ((amap + (offset + slope * coarse_map)) / 2).astype(amap.dtype)

    # ------------------------------------------------------------------ state
    def meta(self) -> dict[str, Any]:
        """The ``coarse`` header: the coarse model's own header and the two affines."""
        state = self.model.get_state()
        return {
            "model": state.meta,
            "score_affine": None if self.score_affine is None else list(self.score_affine),
            "map_affine": None if self.map_affine is None else list(self.map_affine),
        }

    def tensors(self) -> dict[str, np.ndarray]:
        return {PREFIX + name: value for name, value in self.model.get_state().tensors.items()}

    @staticmethod
    def shard_state(state: DetectorState) -> DetectorState:
        """The coarse bank's own state inside a model's ``state`` (its ``coarse`` header's model and the
        ``coarse.*`` tensors)."""
        meta = state.meta.get("coarse")
        if not isinstance(meta, dict) or set(meta) != {"model", "score_affine", "map_affine"}:
            raise PatchCoreError("the coarse bank's header must hold model, score_affine and map_affine")
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
        score_affine = _affine_or_none(meta["score_affine"], "score affine")
        return cls(model, score_affine, _affine_or_none(meta["map_affine"], "map affine"))


def _pixels(maps: list[np.ndarray]) -> np.ndarray:
    """Every :data:`PIXEL_STRIDE`-th row and column of each map, as one 1-d array."""
    return np.concatenate([np.asarray(m)[::PIXEL_STRIDE, ::PIXEL_STRIDE].ravel() for m in maps])
