"""The detector contract: what every detector (a PatchCore model, an ensemble) offers, and all that the
layers above (command line, evaluation, reports, and every adapter to come) may use of one.

A detector follows scikit-learn's estimator contract: ``__init__`` only stores settings
(``get_params``/``set_params``, so ``sklearn.base.clone`` works), ``fit`` returns self, learned state
ends in ``_``, and using an unfitted detector raises :class:`~patchcore.errors.NotFittedError`.

:class:`Scorer` is the part that only scores (infer, scores, maps, predictions, decisions): a deployed
model that cannot learn (the torch-free ONNX runtime) is a Scorer. A :class:`Detector` learns too.

A subclass implements :meth:`~Detector.fit`, :meth:`~Detector.partial_fit`, :meth:`~Detector.infer`,
the distributed fit (:meth:`~Detector.calibration_split`, :meth:`~Detector.fit_shard`, :meth:`~Detector.merge_shards`),
:meth:`~Detector.get_state`, :meth:`~Detector.from_state`, :meth:`~Detector.describe`,
:attr:`~Detector.memory_bank_size` and the two hooks ``_check_fitted`` and ``_manual_thresholds``;
scoring, maps, predictions, thresholds and files are shared here.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from ..core.thresholds import (
    Thresholds,
    f1_threshold,
    fpr_threshold,
    logistic_scores,
    normalized_scores,
)
from ..errors import NotFittedError, PatchCoreError
from ..imaging import Geometry, ImageLike, TiledGeometry, map_to_original
from ..persistence import DetectorState, read_state, state_to_bytes, write_state

logger = logging.getLogger(__name__)

D = TypeVar("D", bound="Detector")

#: Settings that change how fast a detector runs, never its results (constructor and ``load`` keywords).
RUNTIME = ("device", "batch_size", "chunk_size", "search", "progress", "max_pixels")
DEFAULT_BATCH_SIZE = 32


class Inference(NamedTuple):
    """One image's result as a detector computes it: the image score, the anomaly map at the model's input
    resolution (None when maps were not asked for; with tiles, the stitched map at the scaled image size)
    and the geometry that maps it back onto the original image (:func:`patchcore.imaging.map_to_original`)."""

    score: float
    input_map: np.ndarray | None
    geometry: Geometry | TiledGeometry

    def map(self) -> np.ndarray:
        """The input-resolution map, or an error saying how to get one."""
        if self.input_map is None:
            raise PatchCoreError("no anomaly map: this result was computed with maps=False")
        return self.input_map


@dataclass(frozen=True)
class Prediction:
    """One image's result: its score and its anomaly map on the original image, (H, W) float32.

    With a threshold: ``is_anomalous`` (score >= threshold) and ``normalized_score`` (0.5 at the threshold);
    both None without one.
    """

    score: float
    anomaly_map: np.ndarray
    threshold: float | None = None
    is_anomalous: bool | None = None
    normalized_score: float | None = None


def check_keys(meta: dict[str, Any], allowed: set[str], what: str) -> None:
    """Refuse a header section with keys this version does not know (an edit, or a newer writer)."""
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise PatchCoreError(f"unknown {what} field(s) {', '.join(unknown)}")


def header_dict(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """``meta[key]``, which must be a JSON object (a mapping): anything else raises PatchCoreError."""
    value = meta[key]
    if not isinstance(value, dict):
        raise PatchCoreError(f"'{key}' must be a mapping, not {type(value).__name__}")
    return value


class Scorer(ABC):
    """What scores images: per image a score and a map (:meth:`infer`), and the decisions that follow from
    the thresholds. Every :class:`Detector` is one; so is a deployed model that cannot learn
    (:class:`patchcore.runtime.OnnxDetector`, which runs without torch).
    """

    #: "distance": scores are non-negative distances (normalised as s / (s + t)); "standardized": scores
    #: of any sign in standard deviations of good images (normalised by a logistic around t).
    score_scale: str = "distance"

    batch_size: int | None
    thresholds_: Thresholds
    n_train_: int
    fit_stats_: dict[str, Any]

    @abstractmethod
    def infer(self, images: Sequence[ImageLike], *, maps: bool = True) -> Iterator[Inference]:
        """One :class:`Inference` per image, lazily, in order, ``batch_size`` images at a time."""

    @abstractmethod
    def _check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless fitted."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (the config, or the ensemble's members and settings)."""

    @property
    @abstractmethod
    def memory_bank_size(self) -> int:
        """Rows in the memory bank(s)."""

    def resolved_batch_size(self) -> int:
        """The images handled together: ``batch_size``, or 32 when it is None."""
        if self.batch_size is None:
            return DEFAULT_BATCH_SIZE
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PatchCoreError(f"batch_size={self.batch_size!r} must be a positive whole number (or None for 32)")
        return self.batch_size

    # ------------------------------------------------------------------ scores and maps
    def score_samples(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Image anomaly scores, (N,) float64; higher means more anomalous."""
        return np.array([r.score for r in self.infer(images, maps=False)], dtype=np.float64)

    def anomaly_maps(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Pixel anomaly maps at the model's input resolution, (N, H, W) float32.

        Images whose maps differ in size (keep_aspect without crop, or tiles) raise an error: use
        :meth:`predict` for one map per image at its original size.
        """
        maps = [r.map() for r in self.infer(images, maps=True)]
        if len({m.shape for m in maps}) > 1:
            raise PatchCoreError(
                "these images give anomaly maps of different sizes (keep_aspect without crop, or tile_size): "
                "use predict() for one map per image at its original size"
            )
        return np.stack(maps) if maps else np.empty((0, 0, 0), np.float32)

    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        """Per image: score, anomaly map on the original image, and the decision when a threshold is set."""
        return [
            Prediction(r.score, map_to_original(r.map(), r.geometry), **self.decide(r.score))
            for r in self.infer(images, maps=True)
        ]

    # ------------------------------------------------------------------ thresholds
    @property
    def threshold_(self) -> float | None:
        """The image threshold (None when the detector has none)."""
        self._check_fitted()
        return self.thresholds_.image

    def decide(self, score: float) -> dict[str, Any]:
        """threshold, is_anomalous and normalized_score of one raw score (all None without a threshold)."""
        threshold = self.threshold_
        if threshold is None:
            return {"threshold": None, "is_anomalous": None, "normalized_score": None}
        normalize = normalized_scores if self.score_scale == "distance" else logistic_scores
        return {
            "threshold": threshold,
            "is_anomalous": bool(score >= threshold),
            "normalized_score": float(normalize(np.array([score]), threshold)[0]),
        }


class Detector(Scorer):
    """The contract every detector satisfies; see the module docstring.

    Learned state (after ``fit``, ``from_state`` or ``load``): ``n_train_`` (good images in the bank),
    ``fit_stats_`` (timings and sizes of the last fit), ``thresholds_`` (:class:`Thresholds`).
    """

    #: The model-file kind this detector is stored as (registered in ``patchcore.detectors.KINDS``).
    kind: ClassVar[str]

    provenance_: dict[str, Any]  # set by from_state: format and package version and time of the state's file

    # ------------------------------------------------------------------ what a detector implements
    @abstractmethod
    def fit(self: D, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> D:
        """Learn from good images only. Returns self. ``root``: the data folder image paths are recorded
        relative to (for :meth:`explain`)."""

    @abstractmethod
    def partial_fit(self: D, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> D:
        """Add good images to a fitted detector without revisiting the old ones. Returns self."""

    @abstractmethod
    def calibration_split(self, images: Sequence[ImageLike]) -> tuple[list[ImageLike], list[ImageLike]]:
        """(the images ``fit`` puts into the memory bank(s), the images it holds out for calibration)."""

    @abstractmethod
    def fit_shard(self, images: Sequence[ImageLike], n_shards: int) -> list[bytes]:
        """Distributed fit, on a worker: the bank(s) of one of ``n_shards`` shards of the bank images (see
        :meth:`calibration_split`) as model-file bytes, one per bank; the detector itself stays unfitted."""

    @abstractmethod
    def merge_shards(self: D, parts: Sequence[Sequence[bytes]], calibration: Sequence[ImageLike]) -> D:
        """Distributed fit, on the driver: fit from every shard's :meth:`fit_shard` output (a greedy coreset over
        the union of theirs) and the held-out ``calibration`` images. Returns self."""

    def explain(self, image: ImageLike, *, data_root: Any = None) -> Any:
        """The most anomalous patch of ``image`` and the nearest normal patch (an
        :class:`~patchcore.detectors.explain.Explanation`); detectors that cannot say raise PatchCoreError."""
        raise PatchCoreError(
            f"explain() is not available for a {type(self).__name__} yet: explain one of its members "
            "(e.g. ensemble.models_[0].explain(image))"
        )

    @abstractmethod
    def get_state(self) -> DetectorState:
        """The fitted detector as data (what its model file holds)."""

    @classmethod
    @abstractmethod
    def from_state(cls: type[D], state: DetectorState, *, source: str | os.PathLike = "state", **runtime: Any) -> D:
        """A fitted detector from :meth:`get_state`'s output; ``runtime`` as the constructor's runtime
        arguments (device, batch_size, search, progress); ``source`` names the state in error messages."""

    @abstractmethod
    def _manual_thresholds(self) -> tuple[float | None, float | None]:
        """(image, pixel) thresholds given by hand in the settings; calibration keeps them."""

    def calibrate(self: D, good_images: Sequence[ImageLike], fpr: float) -> D:
        """Set the image and pixel thresholds from good images that are not in the bank. Returns self.

        The image threshold flags a fraction ``fpr`` of these images; the pixel threshold a fraction
        ``fpr`` of their anomaly-map pixels (thresholds given by hand in the settings are kept).
        """
        self._check_fitted()
        scores, pixels = [], []
        for result in self.infer(list(good_images), maps=True):
            scores.append(result.score)
            pixels.append(result.map().ravel())
        image, pixel = self._manual_thresholds()
        self.thresholds_ = Thresholds(
            image=image if image is not None else fpr_threshold(np.array(scores), fpr),
            pixel=pixel if pixel is not None else fpr_threshold(np.concatenate(pixels), fpr),
            method="manual" if image is not None else "fpr",
            fpr=fpr,
            n_calibration=len(scores),
        )
        return self

    def calibrate_f1(self: D, good_images: Sequence[ImageLike], defective_images: Sequence[ImageLike]) -> D:
        """Set the image threshold that maximises F1 on labelled images (none of them in the bank). Returns self.

        The pixel threshold is left as it is (it needs pixel labels; :meth:`calibrate` sets one from good images).
        """
        good, defective = list(good_images), list(defective_images)
        scores = self.score_samples(good + defective)
        labels = np.r_[np.zeros(len(good)), np.ones(len(defective))]
        self.thresholds_ = Thresholds(
            image=f1_threshold(labels, scores), pixel=self.thresholds_.pixel, method="f1", n_calibration=len(scores)
        )
        return self

    def set_threshold(self: D, image: float | None, pixel: float | None = None) -> D:
        """Thresholds by hand. Returns self. Distances need positive thresholds; any finite value otherwise."""
        for name, value in (("threshold", image), ("pixel threshold", pixel)):
            if value is None:
                continue
            if not np.isfinite(value) or (self.score_scale == "distance" and not value > 0):
                raise PatchCoreError(
                    f"{name} {value} must be a positive number (scores are distances)"
                    if self.score_scale == "distance"
                    else f"{name} {value} must be a finite number"
                )
        self._check_fitted()
        self.thresholds_ = Thresholds(image=image, pixel=pixel, method="manual")
        return self

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector atomically as one model file (see :mod:`patchcore.persistence`)."""
        self._check_fitted()
        write_state(path, self.get_state())

    def to_bytes(self) -> bytes:
        """The fitted detector as the bytes of its model file (``patchcore.detectors.loads`` reads them back):
        how it travels to other processes and machines, without pickle."""
        self._check_fitted()
        return state_to_bytes(self.get_state())

    @classmethod
    def load(cls: type[D], path: str | os.PathLike, **runtime: Any) -> D:
        """Read a model file written by :meth:`save`, refusing edited, truncated or foreign files."""
        state = read_state(path)
        if state.kind != cls.kind:
            raise PatchCoreError(f"{path}: holds a {state.kind}, not a {cls.kind}: load it with patchcore.load(path)")
        return cls.from_state(state, source=path, **runtime)


def not_fitted(name: str) -> NotFittedError:
    return NotFittedError(f"this {name} is not fitted yet: call fit(images) or {name}.load(path)")
