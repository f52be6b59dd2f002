"""Choose settings without defect samples: a small grid scored on seeded synthetic defects of held-out
good images (``patchcore tune``).

The good images are split (seeded) into those the candidates are fitted on and a held-out share; every
held-out image is scored as it is and once more with one synthetic defect (:mod:`patchcore.tune.defects`,
the kinds in turn), so each candidate's synthetic image AUROC compares the same images with and without a
defect. The defaults (the candidate named ``default``) are kept unless another candidate's synthetic AUROC
beats theirs by more than the standard error of the difference: the synthetic set is small (at most 40
images of each label, a standard error of about 0.02 per AUROC) and the defaults were chosen on real
defects. Otherwise the pick is the candidate with the highest synthetic AUROC; candidates within
``tolerance`` of it count as tied and the cheapest of them (fit plus prediction time) wins. The chosen
settings are then fitted on every good image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import PatchCoreConfig
from ..core.thresholds import split_calibration
from ..detectors.base import Detector
from ..errors import PatchCoreError
from ..imaging import ImageLike, load_image
from .defects import DEFECTS, make_defects

logger = logging.getLogger(__name__)

#: The grid: name -> PatchCoreConfig fields over the base settings. Small on purpose (each is a fit): the
#: default (a blocks.2 bank, a blocks.2 + blocks.3 coarse bank for the maps and the global branch; tune ranks
#: by image AUROC, which the coarse bank does not change, so no candidate varies it), the former default bank
#: alone (blocks.2 + blocks.3, the paper's method), that bank with the global branch, the layers and size
#: that won elsewhere (blocks.4 on grey crops, 256 px for pixel maps, issue 12), and multi-level models (a
#: second bank, a branch at 128 px).
GRID: dict[str, dict[str, Any]] = {
    "default": {},
    "bank-only": {"layers": ["blocks.2", "blocks.3"], "global_branch": False, "coarse_branch": False},
    "mid": {"layers": ["blocks.2", "blocks.3"]},  # no coarse bank: it would be the bank's twin
    "deep": {"layers": ["blocks.2", "blocks.4"]},
    "256": {"resize": 256},
    "multilevel": {"level_sets": ["blocks.2+blocks.3"], "global_layers": ["blocks.2"]},
    "multilevel-deep": {"level_sets": ["blocks.2+blocks.4"], "global_layers": ["blocks.2"]},
}
TOLERANCE = 0.005
DEFAULT = "default"


@dataclass
class Candidate:
    """One row of the tune table: the candidate's settings, synthetic AUROCs (all and per defect kind) and
    cost (fit seconds, prediction seconds per image)."""

    name: str
    settings: dict[str, Any]
    synthetic_auroc: float = float("nan")
    by_kind: dict[str, float] = field(default_factory=dict)
    fit_seconds: float = float("nan")
    predict_seconds_per_image: float = float("nan")
    error: str | None = None
    standard_error: float = float("nan")

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "synthetic_auroc": self.synthetic_auroc,
            "standard_error": self.standard_error,
            **{f"auroc_{kind}": self.by_kind.get(kind) for kind in DEFECTS},
            "fit_seconds": self.fit_seconds,
            "predict_seconds_per_image": self.predict_seconds_per_image,
            "settings": self.settings,
            "error": self.error,
        }


def synthetic_split(
    images: Sequence[ImageLike], holdout_share: float, seed: int, max_holdout: int = 40
) -> tuple[list[ImageLike], list[np.ndarray], list[np.ndarray], list[str]]:
    """(fit images, held-out good arrays, the same with one defect each, each defect's kind), seeded.

    Images are (H, W, 3) uint8 for the defects; at most ``max_holdout`` are held out (the rest still fit)."""
    images = list(images)
    keep, held = split_calibration(len(images), holdout_share, seed)
    if len(held) > max_holdout:  # more held out than needed: the rest still fit
        keep, held = np.sort(np.concatenate([keep, held[max_holdout:]])), held[:max_holdout]
    if len(held) < 2:
        raise PatchCoreError("tune needs at least 2 held-out good images: give at least 10 good images")
    good = [np.clip(np.rint(load_image(images[i]) * 255), 0, 255).astype(np.uint8) for i in held]
    defects = make_defects(good, seed)
    return [images[i] for i in keep], good, [d for d, _, _ in defects], [k for _, _, k in defects]


def auroc_standard_error(value: float, n_positive: int, n_negative: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUROC of ``value`` over these many positives and negatives.

    >>> round(auroc_standard_error(0.96, 40, 40), 3)
    0.023
    """
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    variance = value * (1 - value) + (n_positive - 1) * (q1 - value**2) + (n_negative - 1) * (q2 - value**2)
    return float(np.sqrt(max(variance, 0.0) / (n_positive * n_negative)))


def _difference_error(a: Candidate, b: Candidate) -> float:
    errors = [c.standard_error for c in (a, b) if np.isfinite(c.standard_error)]
    return float(np.sqrt(sum(e * e for e in errors)))


def pick(candidates: Sequence[Candidate], tolerance: float = TOLERANCE) -> Candidate:
    """The ``default`` candidate unless the best beats it by more than the standard error of their difference
    (the two standard errors in quadrature, as for independent estimates: the correlation of scores on the
    same images would only shrink it); otherwise the candidate with the highest synthetic AUROC, the cheapest
    among those within ``tolerance`` of it."""
    valid = [c for c in candidates if c.error is None and np.isfinite(c.synthetic_auroc)]
    if not valid:
        raise PatchCoreError("no candidate of the grid could be fitted: see the table's error column")
    best = max(valid, key=lambda c: c.synthetic_auroc)
    default = next((c for c in valid if c.name == DEFAULT), None)
    if default is not None and default.synthetic_auroc >= best.synthetic_auroc - _difference_error(best, default):
        return default
    tied = [c for c in valid if c.synthetic_auroc >= best.synthetic_auroc - tolerance]
    return min(tied, key=lambda c: c.fit_seconds + 100 * c.predict_seconds_per_image)


def evaluate_grid(
    images: Sequence[ImageLike],
    grid: dict[str, dict[str, Any]],
    build: Callable[[dict[str, Any]], Detector],
    *,
    holdout_share: float = 0.2,
    seed: int = 0,
) -> list[Candidate]:
    """Fit every candidate of ``grid`` on the fit share of ``images`` and score it on the synthetic set.

    ``build(settings)`` returns an unfitted detector for a candidate's settings. A candidate that fails
    (e.g. a layer its backbone lacks) keeps its error in the table instead of ending the run."""
    from ..evaluation.metrics import auroc  # scipy: the torch-free runtime's CLI imports this module, not it

    fit_images, good, defective, kinds = synthetic_split(images, holdout_share, seed)
    labels = np.r_[np.zeros(len(good)), np.ones(len(defective))]
    kind_array = np.array(["good"] * len(good) + kinds)
    out = []
    for name, settings in grid.items():
        candidate = Candidate(name, settings)
        try:
            detector = build(settings)
            started = time.perf_counter()
            detector.fit(fit_images)
            candidate.fit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            scores = detector.score_samples([*good, *defective])
            candidate.predict_seconds_per_image = (time.perf_counter() - started) / len(labels)
        except PatchCoreError as exc:
            candidate.error = str(exc)
            logger.warning("tune: candidate %s failed: %s", name, exc)
            out.append(candidate)
            continue
        candidate.synthetic_auroc = auroc(labels, scores)
        candidate.standard_error = auroc_standard_error(candidate.synthetic_auroc, len(defective), len(good))
        for kind in sorted(set(kinds)):
            chosen = (kind_array == "good") | (kind_array == kind)
            candidate.by_kind[kind] = auroc(labels[chosen], scores[chosen])
        logger.info("tune: %s synthetic AUROC %.3f", name, candidate.synthetic_auroc)
        out.append(candidate)
    return out


def candidate_config(base: dict[str, Any], settings: dict[str, Any], given: Sequence[str] = ()) -> PatchCoreConfig:
    """A candidate's config: ``base`` settings, the candidate's over them, and the settings the user fixed
    (``given``, a subset of ``base``'s keys) over both: fixed flags win."""
    fixed = {k: base[k] for k in given if k in base}
    return PatchCoreConfig.from_dict({**base, **settings, **fixed})
