"""A single-bank model's image-level ("global") branch: a Gaussian of every input's mean patch feature.

A global texture change (a finer weave, a colour cast) raises every patch's distance to the bank a little
and none of them much, so the bank's image score hardly moves; the image's mean feature moves off the good
images' cloud. The branch models that cloud (:mod:`patchcore.core.gaussian`) and scores an input by its
Mahalanobis distance, put onto the bank's score scale by :func:`~patchcore.core.gaussian.robust_affine`
on held-out good images (their quartiles), so that the image score is simply the larger of the two. It
reuses the bank's own patch features: no backbone work of its own.

The training inputs' mean features are kept (``features``, (N, D) float32, a few KiB per image): shards
merge and ``partial_fit`` extends by refitting the Gaussian over the union.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..core.gaussian import Gaussian, fit_gaussian, mahalanobis, robust_affine
from ..errors import PatchCoreError
from .feature_batches import FeatureBatch

logger = logging.getLogger(__name__)

TENSORS = ("features", "mean", "scale", "precision")


def input_means(batch: FeatureBatch) -> np.ndarray:
    """(B, D) float32: per model input of ``batch`` the mean of its patch features (rows)."""
    if len(set(batch.grids)) == 1:
        h, w = batch.grids[0]
        means = batch.rows.reshape(len(batch), h * w, -1).mean(dim=1)
    else:
        means = torch.stack([part.mean(dim=0) for part in batch.split(batch.rows)])
    return means.float().cpu().numpy()


@dataclass(frozen=True)
class GlobalBranch:
    """``features`` (N, D) of the training inputs, their ``gaussian``, and ``affine`` (offset, slope) onto
    the bank's scores (None until :meth:`calibrated`, e.g. in a shard)."""

    features: np.ndarray
    gaussian: Gaussian
    affine: tuple[float, float] | None = None

    @classmethod
    def fit(cls, features: np.ndarray) -> GlobalBranch | None:
        """The branch of these (N, D) mean features; None (logged) with fewer than 2 rows."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape[0] < 2:
            logger.warning("the global branch needs at least 2 training inputs: fitted without it")
            return None
        return cls(features, fit_gaussian(features))

    def extended(self, features: np.ndarray) -> GlobalBranch:
        """The branch over these training inputs and more (partial_fit, merged shards); the affine is kept."""
        union = np.concatenate([self.features, np.asarray(features, dtype=np.float32)])
        return replace(self, features=union, gaussian=fit_gaussian(union))

    def distances(self, means: np.ndarray) -> np.ndarray:
        """(B, D) mean features -> (B,) Mahalanobis distances."""
        return mahalanobis(means, self.gaussian)

    def calibrated(self, bank_scores: np.ndarray, distances: np.ndarray) -> GlobalBranch | None:
        """With the affine that gives held-out good inputs' distances their bank scores' quartiles; None
        (logged) when there are fewer than 2 or their distances do not vary."""
        try:
            offset, slope = robust_affine(bank_scores, distances)
        except ValueError as exc:
            logger.warning("the global branch cannot be calibrated (%s): fitted without it", exc)
            return None
        if not slope > 0:
            logger.warning("the held-out images' bank scores do not vary: fitted without the global branch")
            return None
        return replace(self, affine=(offset, slope))

    def combined(self, bank_scores: list[float], means: np.ndarray) -> list[float]:
        """Per input the image score: the larger of its bank score and its distance on the bank's scale."""
        if self.affine is None:
            raise PatchCoreError("the global branch is not calibrated: fit the model on all its images")
        offset, slope = self.affine
        mapped = offset + slope * self.distances(means)
        return [max(score, float(value)) for score, value in zip(bank_scores, mapped)]

    # ------------------------------------------------------------------ state
    def meta(self) -> dict[str, Any]:
        return {"affine": None if self.affine is None else list(self.affine), "shrinkage": self.gaussian.shrinkage}

    def tensors(self) -> dict[str, np.ndarray]:
        g = self.gaussian
        arrays = {"features": self.features, "mean": g.mean, "scale": g.scale, "precision": g.precision}
        return {f"global.{name}": np.array(value) for name, value in arrays.items()}

    @classmethod
    def from_state(cls, meta: Any, tensors: dict[str, np.ndarray], dim: int) -> GlobalBranch:
        """The branch a model file holds (its ``global`` header and ``global.*`` tensors), checked against the
        bank's ``dim``; PatchCoreError naming what is wrong otherwise."""
        if not isinstance(meta, dict) or set(meta) != {"affine", "shrinkage"}:
            raise PatchCoreError("the global branch's header must hold affine and shrinkage")
        try:
            features, mean, scale, precision = (np.asarray(tensors[f"global.{name}"]) for name in TENSORS)
        except KeyError as exc:
            raise PatchCoreError(f"the global branch's tensor {exc} is missing") from None
        affine, shrinkage = meta["affine"], meta["shrinkage"]
        shapes_ok = (
            features.ndim == 2
            and features.shape[0] >= 2
            and features.shape[1] == dim
            and mean.shape == scale.shape == (dim,)
            and precision.shape == (dim, dim)
        )
        if not shapes_ok:
            raise PatchCoreError(f"the global branch's tensors are mis-shaped for {dim}-dimensional features")
        if not all(np.isfinite(a).all() for a in (features, mean, scale, precision)) or not (scale > 0).all():
            raise PatchCoreError("the global branch's tensors hold NaN, infinite or non-positive scale values")
        if affine is not None and not (
            isinstance(affine, list) and len(affine) == 2 and all(isinstance(v, (int, float)) for v in affine)
        ):
            raise PatchCoreError(f"the global branch's affine {affine!r} must be two numbers or null")
        if affine is not None and not (np.isfinite(affine).all() and affine[1] > 0):
            raise PatchCoreError(f"the global branch's affine {affine!r} must be finite with a positive slope")
        if not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
            raise PatchCoreError(f"the global branch's shrinkage {shrinkage!r} must lie in [0, 1]")
        gaussian = Gaussian(
            mean.astype(np.float64), scale.astype(np.float64), precision.astype(np.float64), float(shrinkage)
        )
        pair = None if affine is None else (float(affine[0]), float(affine[1]))
        return cls(features.astype(np.float32), gaussian, pair)
