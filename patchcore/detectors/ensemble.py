"""Ensembles of backbones (PatchCore section 4.4 / SPEC step 8): one memory bank per member.

Members are ordinary :class:`PatchCore` models fitted on the same good images. Their scores live on
different scales, so each member's image scores (and map pixels) are standardised with the mean and
standard deviation it gives on held-out good images, which never enter any bank; the ensemble score is
the mean of the standardised member scores, and the ensemble map the mean of the standardised maps.
Scores are therefore in standard deviations of good images (0 = an average good image), of any sign.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..config import PatchCoreConfig
from ..core.thresholds import is_count, split_calibration
from ..errors import PatchCoreError
from ..imaging import DEFAULT_MAX_PIXELS, ImageLike, load_image
from ..persistence import DetectorState
from ..persistence.model_file import ENSEMBLE_KIND, SINGLE_KIND
from .base import RUNTIME, Detector, Inference, Thresholds, check_keys, header_dict, not_fitted
from .patchcore import PatchCore

logger = logging.getLogger(__name__)

SETTINGS = ("calibration_share", "seed", "threshold_fpr", "threshold", "pixel_threshold")
# what every member must share so that their maps align pixel for pixel
SHARED_GEOMETRY = ("resize", "crop", "keep_aspect", "tile_size", "tile_overlap", "tile_scale")


class PatchCoreEnsemble(Detector):
    """Several PatchCore members, e.g. ``PatchCoreEnsemble([PatchCoreConfig(backbone="efficientnet_lite0"),
    PatchCoreConfig(backbone="efficientnet_lite1")])``.

    All members must share ``resize``, ``crop``, ``keep_aspect`` and the tile settings so their maps align.
    A seeded ``calibration_share`` of the training images (never in any bank) standardises the scores and,
    with ``threshold_fpr``, sets the thresholds on the standardised scores; ``threshold`` and
    ``pixel_threshold`` set them by hand (in standard deviations). The members' own threshold settings
    are ignored.

    Learned state: ``models_`` (the fitted members), ``score_stats_`` and ``pixel_stats_`` ((members, 2):
    mean and standard deviation on the calibration images), ``n_train_``, ``n_calibration_``,
    ``fit_stats_``, ``thresholds_``.
    """

    kind = ENSEMBLE_KIND
    score_scale = "standardized"

    def __init__(
        self,
        members: Sequence[PatchCoreConfig],
        *,
        calibration_share: float = 0.2,
        seed: int = 0,
        threshold_fpr: float | None = None,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        search: str = "exact",
        progress: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.members = members
        self.calibration_share = calibration_share
        self.seed = seed
        self.threshold_fpr = threshold_fpr
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.device = device
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.search = search
        self.progress = progress
        self.max_pixels = max_pixels

    # ------------------------------------------------------------------ scikit-learn parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("members", *SETTINGS, *RUNTIME)}

    def set_params(self, **params: Any) -> PatchCoreEnsemble:
        unknown = sorted(set(params) - {"members", *SETTINGS, *RUNTIME})
        if unknown:
            raise ValueError(f"invalid parameter(s) {', '.join(unknown)} for PatchCoreEnsemble")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _runtime(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUNTIME}

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> PatchCoreEnsemble:
        """Fit every member on the same good images, minus the held-out calibration share. Returns self.

        The held-out images also put each member's global branch and coarse bank onto its bank's scale: a
        member holds out nothing of its own, and a fit on Ray (:meth:`merge_shards`) gives the same members.
        """
        train, calibration = self.calibration_split(images)
        self.models_ = [
            PatchCore(config, **self._runtime())._fit(train, calibration, root) for config in self._member_configs()
        ]
        self._standardize(len(train), calibration)
        self.fit_stats_ = self._summed_stats()
        return self

    def _check_settings(self) -> None:
        if len(self.members) < 2:
            raise PatchCoreError("an ensemble needs at least two members (backbones)")
        if len({tuple(getattr(c, name) for name in SHARED_GEOMETRY) for c in self.members}) > 1:
            raise PatchCoreError(
                "ensemble members must share resize, crop, keep_aspect and the tile settings so their maps align"
            )
        for name, value in (("threshold", self.threshold), ("pixel_threshold", self.pixel_threshold)):
            if value is not None and not np.isfinite(value):
                raise PatchCoreError(f"{name}={value} must be a finite number (standard deviations)")
        if self.threshold_fpr is not None and not 0 < self.threshold_fpr < 1:
            raise PatchCoreError(f"threshold_fpr={self.threshold_fpr} must lie in (0, 1), e.g. 0.05")
        self.resolved_batch_size()

    def _standardize(self, n_train: int, calibration: list[ImageLike]) -> None:
        """The members' statistics on the held-out images, and the thresholds, once the members are fitted."""
        scores, maps = self._member_outputs(calibration)
        # (member, 2) statistics: a zero spread (a single calibration image) falls back to 1
        self.score_stats_ = np.array([[s.mean(), s.std() or 1.0] for s in scores])
        self.pixel_stats_ = np.array([[m.mean(), m.std() or 1.0] for m in maps])
        self.n_train_ = n_train
        self.n_calibration_ = len(calibration)
        self.thresholds_ = Thresholds(
            self.threshold, self.pixel_threshold, "manual" if self.threshold is not None else None
        )
        if self.threshold_fpr is not None and self.threshold is None:
            self.calibrate(calibration, self.threshold_fpr)

    # ------------------------------------------------------------------ fitting in shards (distributed)
    def calibration_split(self, images: Sequence[ImageLike]) -> tuple[list[ImageLike], list[ImageLike]]:
        """(the images ``fit`` puts into the banks, the seeded ``calibration_share`` it holds out)."""
        self._check_settings()
        images = list(images)
        keep, held_out = split_calibration(len(images), self.calibration_share, self.seed)
        return [images[i] for i in keep], [images[i] for i in held_out]

    def fit_shard(self, images: Sequence[ImageLike], n_shards: int) -> list[bytes]:
        """Every member's bank of one shard (:meth:`PatchCore.fit_shard`): one model file's bytes per member."""
        self._check_settings()
        images = list(images)
        return [
            PatchCore(config, **self._runtime()).fit_shard(images, n_shards)[0] for config in self._member_configs()
        ]

    def merge_shards(self, parts: Sequence[Sequence[bytes]], calibration: Sequence[ImageLike]) -> PatchCoreEnsemble:
        """Each member from its banks of the shards (:meth:`PatchCore.merge_shards`), then the standardisation
        and thresholds from ``calibration`` (:meth:`calibration_split`). Returns self."""
        self._check_settings()
        configs = self._member_configs()
        for i, part in enumerate(parts):
            if len(part) != len(configs):
                raise PatchCoreError(f"shard {i} holds {len(part)} banks, not one per member ({len(configs)})")
        self.models_ = [
            PatchCore(config, **self._runtime()).merge_shards([[part[j]] for part in parts], calibration)
            for j, config in enumerate(configs)
        ]
        self._standardize(self.models_[0].n_train_, list(calibration))
        self.fit_stats_ = self._summed_stats()
        return self

    def partial_fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> PatchCoreEnsemble:
        """Add good images to every member (:meth:`PatchCore.partial_fit`). Returns self.

        The standardisation statistics and thresholds are kept; recalibrate when the new images differ.
        """
        self._check_fitted()
        images = list(images)
        for model in self.models_:
            model.partial_fit(images, root=root)
        self.n_train_ += len(images)
        self.fit_stats_ = self._summed_stats()
        if self.threshold_ is not None:
            logger.warning(
                "partial_fit keeps the old standardisation and threshold; recalibrate if the new images differ"
            )
        return self

    def _member_configs(self) -> list[PatchCoreConfig]:
        """The members' configs as fitted: members never hold out images or set thresholds of their own
        (the ensemble's calibration share and thresholds serve them all)."""
        return [c.replace(threshold_fpr=None, threshold=None, pixel_threshold=None) for c in self.members]

    def _summed_stats(self) -> dict[str, Any]:
        keys = ("feature_seconds", "coreset_seconds", "fit_seconds", "full_bank_size")
        return {key: sum(m.fit_stats_.get(key) or 0 for m in self.models_) for key in keys}

    def _member_outputs(self, images: Sequence[ImageLike]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        scores, maps = [], []
        for model in self.models_:
            results = list(model.infer(images, maps=True))
            scores.append(np.array([r.score for r in results]))
            maps.append(np.stack([r.map() for r in results]))
        return scores, maps

    @property
    def memory_bank_size(self) -> int:
        self._check_fitted()
        return sum(model.memory_bank_size for model in self.models_)

    def describe(self) -> dict[str, Any]:
        return {"members": [c.to_dict() for c in self._member_configs()], **{n: getattr(self, n) for n in SETTINGS}}

    def _manual_thresholds(self) -> tuple[float | None, float | None]:
        return self.threshold, self.pixel_threshold

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise not_fitted("PatchCoreEnsemble")

    def infer(self, images: Sequence[ImageLike], *, maps: bool = True) -> Iterator[Inference]:
        """Per image: the mean standardised member score and map (input resolution), and the geometry."""
        self._check_fitted()
        images = list(images)
        size = self.resolved_batch_size()
        for start in range(0, len(images), size):
            chunk = [
                load_image(image, self.max_pixels) for image in images[start : start + size]
            ]  # decoded once for all members
            outputs = [list(model.infer(chunk, maps=maps)) for model in self.models_]
            for i in range(len(chunk)):
                score = np.mean([(out[i].score - mu) / sd for out, (mu, sd) in zip(outputs, self.score_stats_)])
                amap = None
                if maps:
                    amap = np.mean(
                        [(out[i].map() - mu) / sd for out, (mu, sd) in zip(outputs, self.pixel_stats_)], axis=0
                    )
                    amap = amap.astype(np.float32)
                yield Inference(float(score), amap, outputs[0][i].geometry)

    # ------------------------------------------------------------------ state
    def get_state(self) -> DetectorState:
        self._check_fitted()
        members = [model.get_state() for model in self.models_]
        meta = {
            "members": [member.meta for member in members],
            "standardization": {"score": self.score_stats_.tolist(), "pixel": self.pixel_stats_.tolist()},
            "ensemble": {
                **{name: getattr(self, name) for name in SETTINGS},
                "n_train": self.n_train_,
                "n_calibration": self.n_calibration_,
            },
            "thresholds": self.thresholds_.to_dict(),
        }
        tensors = {
            f"member{i}.{name}": array for i, member in enumerate(members) for name, array in member.tensors.items()
        }
        return DetectorState(self.kind, meta, tensors)

    @classmethod
    def from_state(cls, state: DetectorState, *, source: Any = "state", **runtime: Any) -> PatchCoreEnsemble:
        meta = state.meta
        unknown = sorted(set(runtime) - set(RUNTIME))
        if unknown:
            raise PatchCoreError(f"{', '.join(unknown)} cannot apply to an ensemble: use {', '.join(RUNTIME)}")
        try:
            check_keys(meta, {"members", "ensemble", "standardization", "thresholds"}, "ensemble")
            records, info, stats = meta["members"], header_dict(meta, "ensemble"), header_dict(meta, "standardization")
            check_keys(info, {*SETTINGS, "n_train", "n_calibration"}, "ensemble")
            if not isinstance(records, list) or not records:  # one member: a multi-level model with a global branch
                raise PatchCoreError("an ensemble needs a list of members")
            member_states = [
                DetectorState(SINGLE_KIND, record, _member_tensors(state.tensors, f"member{i}."))
                for i, record in enumerate(records)
            ]
            settings = {name: info[name] for name in SETTINGS if info.get(name) is not None}
            score_stats = np.array(stats["score"], dtype=np.float64)
            pixel_stats = np.array(stats["pixel"], dtype=np.float64)
            n_train, n_calibration = info["n_train"], info["n_calibration"]
            if not (is_count(n_train, 1) and is_count(n_calibration, 1)):
                raise PatchCoreError(f"n_train={n_train!r} and n_calibration={n_calibration!r} must be whole numbers")
            if not (np.isfinite(score_stats).all() and np.isfinite(pixel_stats).all()):
                raise PatchCoreError("the standardisation statistics must be finite numbers")
            thresholds = Thresholds.from_dict(meta.get("thresholds"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PatchCoreError(
                f"{source}: the ensemble's header is incomplete or malformed ({exc!r}); refit or restore it"
            ) from exc
        except PatchCoreError as exc:
            raise PatchCoreError(f"{source}: invalid ensemble in the model file ({exc})") from exc
        if score_stats.shape != (len(records), 2) or pixel_stats.shape != (len(records), 2):
            raise PatchCoreError(f"{source}: standardisation statistics do not match the {len(records)} members")
        members = [PatchCore.from_state(member, source=source, **runtime) for member in member_states]
        ensemble = cls([m.config for m in members], **settings, **runtime)
        ensemble.models_ = members
        ensemble.score_stats_, ensemble.pixel_stats_ = score_stats, pixel_stats
        ensemble.n_train_, ensemble.n_calibration_ = n_train, n_calibration
        ensemble.fit_stats_ = {"full_bank_size": sum(m.fit_stats_.get("full_bank_size") or 0 for m in members)}
        ensemble.thresholds_ = thresholds
        ensemble.provenance_ = dict(state.provenance)
        return ensemble


def _member_tensors(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """One member's tensors (its bank, and those of its branches), named as in a model file of its own."""
    own = {name[len(prefix) :]: array for name, array in tensors.items() if name.startswith(prefix)}
    if "memory_bank" not in own:
        raise KeyError(prefix + "memory_bank")
    return own
