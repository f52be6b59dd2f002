"""Ensembles of backbones (PatchCore section 4.4 / SPEC step 8): one memory bank per member.

Members are ordinary :class:`PatchCore` models fitted on the same good images. Their scores live on
different scales, so each member's image scores (and map pixels) are standardised with the mean and
standard deviation it gives on held-out good images, which never enter any bank; the ensemble score is
the mean of the standardised member scores, and the ensemble map the mean of the standardised maps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .config import PatchCoreConfig
from .errors import NotFittedError, PatchCoreError
from .images import Geometry, ImageLike, load_image, map_to_original
from .model import PatchCore, Prediction
from .thresholds import split_calibration

logger = logging.getLogger(__name__)


class PatchCoreEnsemble:
    """Several PatchCore members, e.g. ``PatchCoreEnsemble([PatchCoreConfig(backbone="efficientnet_lite0"),
    PatchCoreConfig(backbone="efficientnet_lite1")])``. All members must share ``resize`` and ``crop`` so
    their maps align (and keep_aspect and the tile settings). ``calibration_share`` of the training images standardise the scores."""

    def __init__(
        self,
        members: Sequence[PatchCoreConfig],
        *,
        calibration_share: float = 0.2,
        seed: int = 0,
        device: str = "cpu",
        batch_size: int | None = None,
        search: str = "exact",
        progress: bool = False,
    ) -> None:
        self.members = list(members)
        self.calibration_share = calibration_share
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.search = search
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Sequence[ImageLike]) -> PatchCoreEnsemble:
        if len(self.members) < 2:
            raise PatchCoreError("an ensemble needs at least two members (backbones)")
        geometry = {(c.resize, c.crop, c.keep_aspect, c.tile_size, c.tile_overlap, c.tile_scale) for c in self.members}
        if len(geometry) > 1:
            raise PatchCoreError(
                "ensemble members must share resize, crop, keep_aspect and the tile settings so their maps align"
            )
        images = list(images)
        keep, held_out = split_calibration(len(images), self.calibration_share, self.seed)
        train = [images[i] for i in keep]
        calibration = [images[i] for i in held_out]
        runtime = dict(device=self.device, batch_size=self.batch_size, search=self.search, progress=self.progress)
        self.models_ = [PatchCore(config, **runtime).fit(train) for config in self.members]
        scores, maps = self._member_outputs(calibration)
        # (member, 2) statistics: a zero spread (a single calibration image) falls back to 1
        self.score_stats_ = np.array([[s.mean(), s.std() or 1.0] for s in scores])
        self.pixel_stats_ = np.array([[m.mean(), m.std() or 1.0] for m in maps])
        self.n_train_ = len(train)
        self.n_calibration_ = len(calibration)
        self.fit_stats_ = {
            key: sum(m.fit_stats_[key] for m in self.models_)
            for key in ("feature_seconds", "coreset_seconds", "fit_seconds", "full_bank_size")
        }
        return self

    def _member_outputs(self, images: Sequence[ImageLike]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        scores, maps = [], []
        for model in self.models_:
            results = list(model._infer(list(images), with_maps=True))
            scores.append(np.array([r[0] for r in results]))
            maps.append(np.stack([r[1].numpy() for r in results]))
        return scores, maps

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise NotFittedError("this ensemble is not fitted yet: call fit(images) or PatchCoreEnsemble.load(path)")

    def _infer(self, images: Sequence[ImageLike], with_maps: bool) -> Iterator[tuple[float, torch.Tensor | None, Geometry]]:
        """Per image: standardised mean score, standardised mean map (input resolution), geometry."""
        self._check_fitted()
        images = list(images)
        for start in range(0, len(images), 32):  # decode each image once for all members
            chunk = [load_image(image) for image in images[start : start + 32]]
            outputs = [list(model._infer(chunk, with_maps)) for model in self.models_]
            for i in range(len(chunk)):
                score = np.mean([(out[i][0] - mu) / sd for out, (mu, sd) in zip(outputs, self.score_stats_)])
                amap = None
                if with_maps:
                    amap = torch.stack([(out[i][1] - mu) / sd for out, (mu, sd) in zip(outputs, self.pixel_stats_)]).mean(0)
                yield float(score), amap, outputs[0][i][2]

    def score_samples(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Standardised ensemble scores (N,); 0 is the mean good calibration image, 1 one standard deviation above."""
        return np.array([s for s, _, _ in self._infer(images, with_maps=False)])

    def anomaly_maps(self, images: Sequence[ImageLike]) -> np.ndarray:
        return np.stack([m.numpy() for _, m, _ in self._infer(images, with_maps=True)])

    def predict_with_input_maps(self, images: Sequence[ImageLike]):
        for score, amap, geometry in self._infer(images, with_maps=True):
            yield score, amap.numpy(), geometry

    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        return [Prediction(s, map_to_original(m, g)) for s, m, g in self.predict_with_input_maps(images)]

    # What the command line and evaluation read off a model.
    @property
    def config(self) -> PatchCoreConfig:
        return self.members[0]

    @property
    def threshold_(self) -> None:
        """Ensembles carry no threshold yet (their scores are standardised, not distances)."""
        return None

    def decide(self, score: float) -> dict[str, Any]:
        return {"threshold": None, "is_anomalous": None, "normalized_score": None}

    @property
    def memory_bank_size(self) -> int:
        self._check_fitted()
        return sum(model.memory_bank_size for model in self.models_)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        from .serialization import ENSEMBLE_FORMAT_NAME, model_record, write_model_file

        self._check_fitted()
        body = {
            "members": [model_record(model) for model in self.models_],
            "standardization": {"score": self.score_stats_.tolist(), "pixel": self.pixel_stats_.tolist()},
            "ensemble": {
                "calibration_share": self.calibration_share,
                "seed": self.seed,
                "n_train": self.n_train_,
                "n_calibration": self.n_calibration_,
            },
        }
        tensors = {f"member{i}.memory_bank": model.memory_bank_ for i, model in enumerate(self.models_)}
        write_model_file(path, body, tensors, kind=ENSEMBLE_FORMAT_NAME)

    @classmethod
    def load(cls, path, *, device: str = "cpu", batch_size: int | None = None, search: str = "exact", progress: bool = False) -> PatchCoreEnsemble:
        from .serialization import ENSEMBLE_FORMAT_NAME, read_header, read_tensors, restore_model

        header = read_header(path)
        if header["format"] != ENSEMBLE_FORMAT_NAME:
            raise PatchCoreError(f"{path}: a single model, not an ensemble; load it with PatchCore.load")
        tensors = read_tensors(path, header)
        records = header["members"]
        runtime = dict(device=device, batch_size=batch_size, search=search, progress=progress)
        info = header["ensemble"]
        ensemble = cls([PatchCoreConfig.from_dict(r["config"]) for r in records],
                       calibration_share=info["calibration_share"], seed=info["seed"], **runtime)
        ensemble.models_ = [
            restore_model(record, tensors[f"member{i}.memory_bank"], path, **runtime) for i, record in enumerate(records)
        ]
        stats = header["standardization"]
        ensemble.score_stats_ = np.array(stats["score"], dtype=np.float64)
        ensemble.pixel_stats_ = np.array(stats["pixel"], dtype=np.float64)
        if ensemble.score_stats_.shape != (len(records), 2) or ensemble.pixel_stats_.shape != (len(records), 2):
            raise PatchCoreError(f"{path}: standardisation statistics do not match the {len(records)} members")
        ensemble.n_train_ = int(info["n_train"])
        ensemble.n_calibration_ = int(info["n_calibration"])
        ensemble.fit_stats_ = {"full_bank_size": sum(m.fit_stats_.get("full_bank_size") or 0 for m in ensemble.models_)}
        ensemble.header_ = header
        return ensemble
