"""Settings chosen without defect samples: synthetic defects on held-out good images (:mod:`.defects`) and a
small grid scored on them (:mod:`.search`); :func:`tune` runs both and fits the pick."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..detectors.base import Detector
from ..imaging import ImageLike
from .defects import DEFECTS, make_defects
from .search import GRID, TOLERANCE, Candidate, candidate_config, evaluate_grid, pick

logger = logging.getLogger(__name__)


def tune(
    images: Sequence[ImageLike],
    base: dict[str, Any] | None = None,
    *,
    given: Sequence[str] = (),
    grid: dict[str, dict[str, Any]] | None = None,
    holdout_share: float = 0.2,
    root: Any = None,
    **runtime: Any,
) -> tuple[Detector, list[Candidate], Candidate]:
    """Score every candidate of ``grid`` (default :data:`GRID`) on synthetic defects of held-out good images,
    pick one (:func:`pick`) and fit it on all ``images``: (fitted detector, the table's candidates, the pick).

    ``base``: PatchCoreConfig fields under every candidate; ``given``: those of them the user fixed (they win
    over the candidates' settings, and fix the geometry). The seed is ``base``'s (default 0)."""
    from ..detectors import create
    from ..imaging.auto_geometry import adapt_geometry

    base = dict(base or {})
    images = list(images)

    def build(settings: dict[str, Any]) -> Detector:
        config = candidate_config(base, settings, given)
        return create(adapt_geometry(config, images, given=[*given, *settings]), **runtime)

    candidates = evaluate_grid(images, grid or GRID, build, holdout_share=holdout_share, seed=base.get("seed", 0))
    chosen = pick(candidates)
    logger.info("tune: picked %s (synthetic AUROC %.3f)", chosen.name, chosen.synthetic_auroc)
    return build(chosen.settings).fit(images, root=root), candidates, chosen


__all__ = ["DEFECTS", "GRID", "TOLERANCE", "Candidate", "evaluate_grid", "make_defects", "pick", "tune"]
