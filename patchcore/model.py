"""The PatchCore estimator: a thin class composing backbone, patch features, coreset, search and maps.

Follows scikit-learn's contract: ``__init__`` only stores settings, ``fit`` returns self, learned state
ends in ``_``, and using an unfitted model raises :class:`NotFittedError`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone
from .config import PatchCoreConfig
from .coreset import StreamingCoreset, coreset_size, greedy_coreset, greedy_extend, random_coreset, rows_for_memory
from .errors import NotFittedError, PatchCoreError
from .features import patch_features
from .images import Geometry, ImageLike, TiledGeometry, describe, load_image, map_to_original, preprocess, stitch_maps
from .images import tile_geometry, tile_inputs
from .maps import anomaly_maps, gaussian_blur
from .scoring import image_score, patch_scores
from .search import SEARCH_BACKENDS, build_index
from .thresholds import f1_threshold, fpr_threshold, normalized_scores, split_calibration

logger = logging.getLogger(__name__)


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


class PatchCore:
    """PatchCore anomaly detector (Roth et al., CVPR 2022).

    ``PatchCore(config=None, **settings)``: settings are :class:`PatchCoreConfig` fields and override
    ``config``. ``device``, ``batch_size``, ``chunk_size``, ``search`` and ``progress`` only change how
    fast it runs, so they are not part of the saved config (``search`` = ``exact``, ``exact-fp32`` or
    ``faiss-flat`` give the exact scores; ``faiss-ivf``/``faiss-hnsw`` are approximate, with a small drift
    measured in benchmarks/search_bench.py). ``batch_size`` (None: 32) is the images decoded, searched and
    scored together; on a CPU the backbone runs them in slices of ~200k pixels (see ``Backbone.forward``).
    """

    def __init__(
        self,
        config: PatchCoreConfig | None = None,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        search: str = "exact",
        progress: bool = False,
        **settings,
    ) -> None:
        self.config = dataclasses.replace(config or PatchCoreConfig(), **settings)
        self.device = device
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.search = search
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Sequence[ImageLike]) -> PatchCore:
        """Build the memory bank from good images and subsample it to the coreset. Returns self."""
        images = list(images)
        if not images:
            raise PatchCoreError("no training images: fit needs at least one good image")
        cfg = self.config
        calibration: list[ImageLike] = []
        if cfg.threshold_fpr is not None and cfg.threshold is None:
            keep, held_out = split_calibration(len(images), cfg.calibration_share, cfg.seed)
            images, calibration = [images[i] for i in keep], [images[i] for i in held_out]
        started = time.perf_counter()
        backbone = self._make_backbone()
        batches = self._features(images, backbone, "extracting features")
        if self.config.max_bank_memory is None:
            coreset, feature_shape, stats = self._coreset_in_memory(batches, len(images))
        else:
            coreset, feature_shape, stats = self._coreset_streaming(batches)
        self._set_bank(coreset)
        self.backbone_ = backbone
        self.feature_shape_ = feature_shape
        self.n_train_ = len(images)
        self.thresholds_ = {
            "image": cfg.threshold, "pixel": cfg.pixel_threshold, "method": "manual" if cfg.threshold else None,
        }
        if calibration:
            self.calibrate(calibration, cfg.threshold_fpr)
        self.fit_stats_ = {**stats, "fit_seconds": time.perf_counter() - started}
        logger.info("memory bank: %d of %d patch features kept", coreset.shape[0], stats["full_bank_size"])
        return self

    def partial_fit(self, images: Sequence[ImageLike]) -> PatchCore:
        """Add good images to a fitted model without re-extracting the old ones. Returns self.

        The new patch features are candidates for the existing coreset: the greedy selection continues
        from the kept rows (:func:`patchcore.coreset.greedy_extend`) until the bank holds
        ``coreset_ratio`` of all patch features seen (or ``coreset_size``). Thresholds are kept as they
        are; recalibrate with :meth:`calibrate` when the new images change what "good" looks like.
        """
        backbone = self._check_fitted()
        images = list(images)
        if not images:
            raise PatchCoreError("no images to add: partial_fit needs at least one good image")
        cfg = self.config
        started = time.perf_counter()
        new = torch.cat([f.reshape(-1, f.shape[-1]).cpu() for f, _ in self._features(images, backbone, "extracting features")])
        feature_seconds = time.perf_counter() - started
        seen = int(self.fit_stats_.get("full_bank_size") or self.memory_bank_.shape[0]) + new.shape[0]
        target = coreset_size(seen, cfg.coreset_ratio, cfg.coreset_size)
        n_add = min(max(0, target - self.memory_bank_.shape[0]), new.shape[0])
        if cfg.coreset_method == "random":
            chosen = random_coreset(new.shape[0], n_add, seed=cfg.seed + self.n_train_)
        else:
            chosen = greedy_extend(self.memory_bank_.cpu(), new, n_add, projection_dim=cfg.projection_dim, seed=cfg.seed)
        self._set_bank(torch.cat([self.memory_bank_.cpu(), new[torch.from_numpy(chosen)]]))
        self.n_train_ += len(images)
        self.fit_stats_ = {
            "feature_seconds": feature_seconds,
            "coreset_seconds": time.perf_counter() - started - feature_seconds,
            "fit_seconds": time.perf_counter() - started,
            "full_bank_size": seen,
        }
        if self.threshold_ is not None:
            logger.warning("partial_fit keeps the old threshold; recalibrate if the new images differ")
        return self

    def calibrate(self, good_images: Sequence[ImageLike], fpr: float) -> PatchCore:
        """Set the image and pixel thresholds from good images that are not in the bank. Returns self.

        The image threshold flags a fraction ``fpr`` of these images; the pixel threshold a fraction
        ``fpr`` of their anomaly-map pixels (manual thresholds in the config are kept).
        """
        scores, maps = [], []
        for score, amap, _ in self._infer(list(good_images), with_maps=True):
            scores.append(score)
            maps.append(amap.numpy().ravel())
        cfg = self.config
        self.thresholds_ = {
            "image": cfg.threshold or fpr_threshold(np.array(scores), fpr),
            "pixel": cfg.pixel_threshold or fpr_threshold(np.concatenate(maps), fpr),
            "method": "manual" if cfg.threshold else "fpr",
            "fpr": fpr,
            "n_calibration": len(scores),
        }
        return self

    def calibrate_f1(self, good_images: Sequence[ImageLike], defective_images: Sequence[ImageLike]) -> PatchCore:
        """Set the image threshold that maximises F1 on labelled images (none of them in the bank). Returns self.

        The pixel threshold is left as it is (it needs pixel labels; use :meth:`calibrate` for one from good images).
        """
        good, defective = list(good_images), list(defective_images)
        scores = self.score_samples(good + defective)
        labels = np.r_[np.zeros(len(good)), np.ones(len(defective))]
        previous = getattr(self, "thresholds_", {})
        self.thresholds_ = {
            "image": f1_threshold(labels, scores),
            "pixel": previous.get("pixel"),
            "method": "f1",
            "n_calibration": len(scores),
        }
        return self

    def set_threshold(self, image: float | None, pixel: float | None = None) -> PatchCore:
        """Thresholds by hand (scores are distances, so both must be positive). Returns self."""
        for name, value in (("threshold", image), ("pixel threshold", pixel)):
            if value is not None and not value > 0:
                raise PatchCoreError(f"{name} {value} must be positive")
        self._check_fitted()
        self.thresholds_ = {"image": image, "pixel": pixel, "method": "manual"}
        return self

    @property
    def memory_bank_size(self) -> int:
        """Rows in the memory bank."""
        self._check_fitted()
        return int(self.memory_bank_.shape[0])

    @property
    def threshold_(self) -> float | None:
        """The image threshold (None when the model has none)."""
        self._check_fitted()
        return getattr(self, "thresholds_", {}).get("image")

    def decide(self, score: float) -> dict:
        """threshold, is_anomalous and normalized_score of one raw score (all None without a threshold)."""
        threshold = self.threshold_
        if threshold is None:
            return {"threshold": None, "is_anomalous": None, "normalized_score": None}
        return {
            "threshold": threshold,
            "is_anomalous": bool(score >= threshold),
            "normalized_score": float(normalized_scores(np.array([score]), threshold)[0]),
        }

    def _coreset_in_memory(self, batches, n_images: int) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """All patch features in one preallocated bank, then one coreset over it."""
        cfg = self.config
        started = time.perf_counter()
        bank: torch.Tensor | None = None
        filled = 0
        for feats, _ in batches:
            rows = feats.reshape(-1, feats.shape[-1])
            if bank is None:  # one preallocated bank: no list of batches plus a concatenated copy
                feature_shape = tuple(feats.shape[1:3])
                bank = torch.empty(n_images * rows.shape[0] // feats.shape[0], rows.shape[1])
            if filled + rows.shape[0] > bank.shape[0]:  # tiles or non-square inputs: more rows than one per image
                bank = torch.cat([bank[:filled], torch.empty(max(filled, rows.shape[0]), bank.shape[1])])
            bank[filled : filled + rows.shape[0]] = rows.cpu()
            filled += rows.shape[0]
        bank = bank[:filled]
        feature_seconds = time.perf_counter() - started
        started = time.perf_counter()
        n_select = coreset_size(bank.shape[0], cfg.coreset_ratio, cfg.coreset_size)
        if cfg.coreset_method == "random":
            chosen = random_coreset(bank.shape[0], n_select, seed=cfg.seed)
        else:
            with self._bar(n_select, "coreset") as bar:
                chosen = greedy_coreset(
                    bank, n_select, projection_dim=cfg.projection_dim, seed=cfg.seed, progress=lambda n: bar.update(n - bar.n)
                )
        coreset = bank[torch.from_numpy(np.asarray(chosen))].contiguous()
        stats = {
            "feature_seconds": feature_seconds,
            "coreset_seconds": time.perf_counter() - started,
            "full_bank_size": int(bank.shape[0]),
        }
        return coreset, feature_shape, stats

    def _coreset_streaming(self, batches) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """Bounded memory: a fixed buffer reduced by greedy coresets whenever it fills (shards), then a
        greedy coreset over what the shards kept. The budget covers the buffer and the reductions'
        temporaries (measured at up to ~8x the buffer), so the buffer gets an eighth of it."""
        cfg = self.config
        if cfg.coreset_method != "greedy":
            raise PatchCoreError("max_bank_memory needs coreset_method='greedy'")
        stream: StreamingCoreset | None = None
        started = time.perf_counter()
        for feats, _ in batches:
            rows = feats.reshape(-1, feats.shape[-1]).cpu()
            if stream is None:
                feature_shape = tuple(feats.shape[1:3])
                max_rows = max(2, rows_for_memory(cfg.max_bank_memory * 2**20 // 8, rows.shape[1]))
                stream = StreamingCoreset(rows.shape[1], max_rows, projection_dim=cfg.projection_dim, seed=cfg.seed)
            stream.add(rows.numpy())
        feature_seconds = time.perf_counter() - started  # includes the shard reductions done on the way
        started = time.perf_counter()
        n_select = coreset_size(stream.n_seen, cfg.coreset_ratio, cfg.coreset_size)
        try:
            with self._bar(n_select, "coreset") as bar:
                rows, info = stream.finish(n_select, progress=lambda n: bar.update(n - bar.n))
        except ValueError as exc:
            raise PatchCoreError(f"{exc} (raise --max-bank-memory, or lower --coreset-ratio)") from exc
        stats = {
            "feature_seconds": feature_seconds,
            "coreset_seconds": time.perf_counter() - started,
            "full_bank_size": int(stream.n_seen),
            "shard_reductions": int(info["n_reductions"]),
        }
        return torch.from_numpy(rows), feature_shape, stats

    def _bar(self, total: int, what: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=what, unit="patch", disable=None if self.progress else True, leave=False)

    def _make_backbone(self) -> Backbone:
        return create_backbone(self.config.backbone, self.config.layers, self.config.weights).to(self.device)

    def _set_bank(self, bank: torch.Tensor) -> None:
        if self.search not in SEARCH_BACKENDS:
            raise PatchCoreError(f"search={self.search!r} is not one of {', '.join(SEARCH_BACKENDS)}")
        self.memory_bank_ = bank.to(self.device, torch.float32)
        self._index = build_index(self.memory_bank_, self.search, self.chunk_size, self.config.seed)

    # ------------------------------------------------------------------ features
    def _normalization(self, backbone: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.config.normalization == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return backbone.mean, backbone.std

    def _inputs(
        self, images: Sequence[ImageLike], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> Iterator[tuple[torch.Tensor, Geometry | TiledGeometry, bool]]:
        """Every model input in order, lazily: (tensor, geometry of its image, whether it is its image's last).

        One input per image, or with tile_size one per tile (the geometry is then the image's TiledGeometry).
        """
        cfg = self.config
        for image in images:
            array = load_image(image)
            if cfg.tile_size is not None:
                geometry = tile_geometry(
                    array.shape[:2], cfg.tile_size, cfg.tile_overlap, cfg.tile_scale, cfg.resize, cfg.crop, cfg.keep_aspect
                )
                last = len(geometry.boxes) - 1
                for i, x in enumerate(tile_inputs(array, geometry, mean, std)):
                    yield x, geometry, i == last
            elif cfg.keep_aspect:
                x, geometry = preprocess(array, cfg.resize, cfg.crop, mean, std, keep_aspect=True)
                yield x, geometry, True
            else:
                self._check_aspect(array.shape[:2], image)
                x, geometry = preprocess(array, cfg.resize, cfg.input_size, mean, std)
                yield x, geometry, True

    def _check_aspect(self, shape: tuple[int, int], image: ImageLike) -> None:
        """Square mode stretches every image to a square: warn once when aspect ratios differ (by > 5%)."""
        aspect = shape[1] / shape[0]
        first = getattr(self, "_first_aspect", None)
        if first is None:
            self._first_aspect = aspect
        elif abs(aspect / first - 1) > 0.05 and not getattr(self, "_aspect_warned", False):
            self._aspect_warned = True
            size = self.config.resize
            logger.warning(
                "%s is %d x %d pixels (H x W, aspect W/H %.2f) but the first image had aspect %.2f: every image "
                "is stretched to a %d x %d square, so they are distorted differently; set keep_aspect (--keep-aspect) "
                "or tile_size (--tile-size) to keep shapes", describe(image), shape[0], shape[1], aspect, first, size, size,
            )

    def _features(
        self, images: Sequence[ImageLike], backbone: Backbone, what: str
    ) -> Iterator[tuple[torch.Tensor, list[tuple[Geometry | TiledGeometry, bool]]]]:
        """Batches of (B, h, w, D) patch features with each input's (image geometry, last input of its image).

        A batch holds up to batch_size consecutive inputs of one shape (tiles of several images may share one).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        mean, std = self._normalization(backbone)
        batch_size = self._batch_size()
        bar = tqdm(total=len(images), desc=what, unit="img", disable=None if self.progress else True, leave=False)

        def run(tensors: list[torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                maps = backbone(torch.stack(tensors).to(self.device))
                return patch_features(maps, cfg.patch_size, cfg.target_dim)

        try:
            tensors: list[torch.Tensor] = []
            owners: list[tuple[Geometry | TiledGeometry, bool]] = []
            for x, geometry, last in self._inputs(images, mean, std):
                if tensors and (len(tensors) == batch_size or x.shape != tensors[0].shape):
                    feats = run(tensors)
                    bar.update(sum(done for _, done in owners))
                    yield feats, owners
                    tensors, owners = [], []
                tensors.append(x)
                owners.append((geometry, last))
            if tensors:
                feats = run(tensors)
                bar.update(sum(done for _, done in owners))
                yield feats, owners
        finally:
            bar.close()

    def _batch_size(self) -> int:
        if self.batch_size is None:
            return 32
        if self.batch_size < 1:
            raise PatchCoreError("batch_size must be at least 1")
        return self.batch_size

    def extract_features(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Patch features of images: (N, h, w, D) float32 (what the bank is made of)."""
        backbone = self._check_fitted()
        return np.concatenate([f.cpu().numpy() for f, _ in self._features(list(images), backbone, "features")])

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> Backbone:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError("this PatchCore model is not fitted yet: call fit(images) or PatchCore.load(path)")
        return self.backbone_

    def _infer(
        self, images: Sequence[ImageLike], with_maps: bool
    ) -> Iterator[tuple[float, torch.Tensor | None, Geometry | TiledGeometry]]:
        """Per image: (image score, anomaly map at input resolution or None, geometry).

        The map is (S, S) (S = crop or resize); with keep_aspect and no crop, the resized image's (H, W);
        with tiling, the tiles' maps stitched at the scaled image's size and the score the tiles' maximum.
        """
        backbone = self._check_fitted()
        cfg = self.config
        index = self._index
        tile_scores: list[float] = []
        tile_maps: list[np.ndarray] = []
        for feats, owners in self._features(list(images), backbone, "scoring"):
            batch, h, w, dim = feats.shape
            flat = feats.reshape(-1, dim)
            first, _ = owners[0]
            shape = tuple(first.tiles[len(tile_scores)].input_shape if isinstance(first, TiledGeometry) else first.input_shape)
            with torch.inference_mode():
                scores, nearest = patch_scores(flat, index, cfg.scoring, cfg.k)
                scores, nearest, flat = scores.view(batch, h * w), nearest.view(batch, h * w), flat.view(batch, h * w, dim)
                maps = _input_maps(scores.view(batch, h, w), shape, cfg.sigma) if with_maps else None
                for i, (geometry, last) in enumerate(owners):
                    score = image_score(scores[i], nearest[i], flat[i], index, cfg.scoring, cfg.num_neighbors, cfg.image_top_k)
                    if not isinstance(geometry, TiledGeometry):
                        yield float(score), (maps[i].cpu() if maps is not None else None), geometry
                        continue
                    tile_scores.append(float(score))
                    if maps is not None:
                        tile_maps.append(maps[i].cpu().numpy())
                    if last:
                        stitched = torch.from_numpy(stitch_maps(tile_maps, geometry)) if maps is not None else None
                        yield max(tile_scores), stitched, geometry
                        tile_scores, tile_maps = [], []

    def score_samples(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Image anomaly scores, (N,) float64; higher means more anomalous."""
        return np.array([score for score, _, _ in self._infer(images, with_maps=False)], dtype=np.float64)

    def anomaly_maps(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Pixel anomaly maps at the model's input resolution, (N, S, S) float32, S = crop (or resize).

        With keep_aspect and no crop they are (N, h, w) at the input size; with tile_size (N, H, W) at the
        (tile_scale-scaled) image size; maps of different sizes raise an error: use :meth:`predict`.
        """
        maps = [amap.numpy() for _, amap, _ in self._infer(images, with_maps=True)]
        size = self.config.input_size
        if len({m.shape for m in maps}) > 1:
            raise PatchCoreError(
                "these images give anomaly maps of different sizes (keep_aspect without crop, or tile_size): "
                "use predict() for one map per image at its original size"
            )
        return np.stack(maps) if maps else np.empty((0, size, size), np.float32)

    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        """Per image: score and anomaly map in the original image's coordinates."""
        return [
            Prediction(score, map_to_original(amap.numpy(), geometry), **self.decide(score))
            for score, amap, geometry in self._infer(images, with_maps=True)
        ]

    def predict_with_input_maps(
        self, images: Sequence[ImageLike]
    ) -> Iterable[tuple[float, np.ndarray, Geometry | TiledGeometry]]:
        """Like :meth:`predict` but yields (score, map at input resolution, geometry), lazily; with tiling the
        map is the stitched one at the scaled image size. ``map_to_original(map, geometry)`` maps it back."""
        for score, amap, geometry in self._infer(images, with_maps=True):
            yield score, amap.numpy(), geometry

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the model atomically as one safetensors file (see :mod:`patchcore.serialization`)."""
        from .serialization import save_model

        self._check_fitted()
        save_model(self, path)

    @classmethod
    def load(cls, path, *, device: str = "cpu", weights: str | None = None, **runtime) -> PatchCore:
        """Read a model file written by :meth:`save`, refusing edited, truncated or foreign files."""
        from .serialization import load_model

        return load_model(path, device=device, weights=weights, **runtime)

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != f.default
        }
        fitted = f", fitted on {self.n_train_} images" if hasattr(self, "n_train_") else ""
        return f"PatchCore({', '.join(f'{k}={v!r}' for k, v in changed.items())}){fitted}"


def _input_maps(grid_scores: torch.Tensor, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """(N, h, w) patch scores -> (N, H, W) maps at the input shape (non-square inputs with keep_aspect)."""
    if shape[0] == shape[1]:
        return anomaly_maps(grid_scores, shape[0], sigma)
    up = torch.nn.functional.interpolate(grid_scores[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)
