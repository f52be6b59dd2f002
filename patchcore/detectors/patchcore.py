"""The PatchCore detector: a thin class composing backbone, patch features, coreset, search and maps.

It satisfies the :class:`~patchcore.detectors.base.Detector` contract; scoring, thresholds and files are
shared there. Its settings are one :class:`~patchcore.config.PatchCoreConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, backbone_spec, create_backbone
from ..config import PatchCoreConfig
from ..core import two_level
from ..core.coreset import (
    StreamingCoreset,
    coreset_size,
    greedy_coreset,
    greedy_extend,
    random_coreset,
    rows_for_memory,
)
from ..core.coreset_torch import greedy_coreset_torch
from ..core.features import patch_features
from ..core.scoring import image_scores, patch_scores
from ..core.thresholds import is_count, split_calibration
from ..errors import PatchCoreError
from ..imaging import (
    DEFAULT_MAX_PIXELS,
    Geometry,
    ImageLike,
    TiledGeometry,
    describe,
    load_image,
    preprocess,
    stitch_maps,
    tile_geometry,
    tile_inputs,
)
from ..persistence import DetectorState, state_from_bytes
from ..persistence.model_file import SINGLE_KIND
from ..search import SEARCH_BACKENDS, build_index
from .base import RUNTIME, Detector, Inference, Thresholds, check_keys, header_dict, not_fitted
from .coarse_branch import CoarseBranch, coarse_config, wants_coarse_bank
from .explain import (
    NOT_RECORDED,
    SOURCE_COLUMNS,
    Explanation,
    SourceLog,
    cell_box,
    check_sources,
    context_box,
    crop,
    nearest_patch,
    train_paths,
)
from .feature_batches import FeatureBatch, batch_image_scores, batch_maps, extract_batch, take_batches
from .global_branch import GlobalBranch, input_means

logger = logging.getLogger(__name__)


class PatchCore(Detector):
    """PatchCore anomaly detector (Roth et al., CVPR 2022).

    ``PatchCore(config=None, **settings)``: settings are :class:`PatchCoreConfig` fields and override
    ``config``. ``device``, ``batch_size``, ``chunk_size``, ``search`` and ``progress`` only change how
    fast it runs (``max_pixels``: image files with more pixels are refused, None for no limit), so they are not
    part of the saved config (``search`` = ``exact``, ``exact-fp32`` or
    ``faiss-flat`` give the exact scores; ``faiss-ivf``/``faiss-hnsw`` are approximate, with a small drift
    measured in benchmarks/search_bench.py). ``batch_size`` (None: 32) is the model inputs (images, or tiles)
    decoded, searched and scored together, of any shapes and at most the pixels of ``batch_size`` square
    inputs (:mod:`.feature_batches`); on a CPU the backbone runs them in slices of ~200k pixels (see
    ``Backbone.forward``).

    Learned state: ``backbone_``, ``memory_bank_`` (M, D), ``feature_shape_`` (h, w of the feature grid),
    ``n_train_``, ``fit_stats_``, ``thresholds_``, ``global_`` (the image-level branch,
    :class:`~patchcore.detectors.global_branch.GlobalBranch`; None without one), ``coarse_`` (the coarse bank,
    :class:`~patchcore.detectors.coarse_branch.CoarseBranch`; None without one); ``bank_source_`` ((M, 8)
    int32, where each bank row came from, see :data:`~patchcore.detectors.explain.SOURCE_COLUMNS`; None for
    model files that predate it) and ``train_paths_`` (the training images' paths relative to the data
    folder, None for arrays).
    """

    kind = SINGLE_KIND

    def __init__(
        self,
        config: PatchCoreConfig | None = None,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        search: str = "exact",
        progress: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **settings: Any,
    ) -> None:
        self.config = (config or PatchCoreConfig()).replace(**settings)
        if self.config.multilevel:  # level_sets, scales, global_layers: several banks and a branch, not one bank
            raise PatchCoreError("these settings describe a multi-level model: use MultiLevelPatchCore(config)")
        self.device = device
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.search = search
        self.progress = progress
        self.max_pixels = max_pixels

    # ------------------------------------------------------------------ scikit-learn parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every config field and runtime setting, as keyword arguments of the constructor."""
        return {
            **{f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)},
            **{name: getattr(self, name) for name in RUNTIME},
        }

    def set_params(self, **params: Any) -> PatchCore:
        """Change settings (config fields or runtime ones); the config is validated again. Returns self."""
        fields = {f.name for f in dataclasses.fields(PatchCoreConfig)}
        unknown = sorted(set(params) - fields - set(RUNTIME))
        if unknown:
            raise ValueError(f"invalid parameter(s) {', '.join(unknown)} for PatchCore")
        self.config = self.config.replace(**{k: v for k, v in params.items() if k in fields})
        for name in RUNTIME:
            if name in params:
                setattr(self, name, params[name])
        return self

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> PatchCore:
        """Build the memory bank from good images and subsample it to the coreset. Returns self.

        With ``global_branch``, ``coarse_branch`` or ``threshold_fpr`` (and no manual ``threshold``), a seeded
        ``calibration_share`` of the images is held out of the banks: it puts the global branch and the coarse
        bank onto the bank's score scale and sets the thresholds (:meth:`calibrate`). ``root``: the data folder;
        the model records the image files' paths relative to it (else to their common folder) for :meth:`explain`.
        """
        images = list(images)
        if not images:
            raise PatchCoreError("no training images: fit needs at least one good image")
        images, calibration = self.calibration_split(images)
        return self._fit(images, calibration, root)

    def _fit(
        self,
        images: list[ImageLike],
        calibration: list[ImageLike],
        root: str | os.PathLike | None,
        shard: bool = False,
    ) -> PatchCore:
        """Bank (global branch, coarse bank) from ``images``; their calibration and the thresholds from
        ``calibration`` (a ``shard``'s branches stay uncalibrated until the shards merge)."""
        cfg = self.config
        started = time.perf_counter()
        backbone = self._make_backbone()
        log = SourceLog()
        means: list[np.ndarray] = []
        batches = self._collect_means(log.watch(self._features(images, backbone, "extracting features")), means)
        if cfg.max_bank_memory is not None:
            coreset, feature_shape, stats, chosen = self._coreset_streaming(batches)
        elif cfg.coreset_method == "greedy" and cfg.exact_coreset_rows is not None and self._on_cpu():
            # on a GPU the bank stays on the device and its exact greedy runs there (see _select)
            coreset, feature_shape, stats, chosen = self._coreset_two_level(batches, len(images))
        else:
            coreset, feature_shape, stats, chosen = self._coreset_in_memory(batches, len(images))
        self._use_bank(coreset)
        self.bank_source_: np.ndarray | None = log.sources(chosen)
        self.train_paths_: list[str | None] = train_paths(images, root)
        self.backbone_ = backbone
        self.feature_shape_ = feature_shape
        self.n_train_ = len(images)
        self.global_ = GlobalBranch.fit(np.concatenate(means)) if means else None
        # without images to calibrate it on (see calibration_split) the coarse bank would be dropped: not fitted
        fit_coarse = wants_coarse_bank(cfg) and (shard or len(calibration) >= 2)
        self.coarse_ = self._fit_coarse(images, root, shard) if fit_coarse else None
        if not shard:
            self._calibrate_branches(calibration)
        self._set_thresholds(calibration)
        self.fit_stats_ = {**stats, "fit_seconds": time.perf_counter() - started}
        if self.coarse_ is not None:
            self.fit_stats_["coarse_seconds"] = self.coarse_.model.fit_stats_["fit_seconds"]
        logger.info("memory bank: %d of %d patch features kept", coreset.shape[0], stats["full_bank_size"])
        return self

    def _collect_means(self, batches: Iterator[FeatureBatch], into: list[np.ndarray]) -> Iterator[FeatureBatch]:
        """``batches`` unchanged; with ``global_branch`` each one's per-input mean features go to ``into``."""
        for batch in batches:
            if self.config.global_branch:
                into.append(input_means(batch))
            yield batch

    def _fit_coarse(self, images: list[ImageLike], root: str | os.PathLike | None, shard: bool) -> CoarseBranch:
        """The coarse bank of ``images`` (uncalibrated). Where its rows came from is not kept: explain() shows
        the fine bank's patches."""
        model = PatchCore(coarse_config(self.config), **self._runtime())
        model._fit(images, [], root, shard=True)
        model.bank_source_, model.train_paths_ = None, []
        return CoarseBranch(model)

    def _runtime(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUNTIME}

    def _calibrate_branches(self, calibration: Sequence[ImageLike]) -> None:
        """Put the global branch and the coarse bank onto the bank's score scale with the held-out good
        ``calibration`` images; without at least 2 of them the model has neither (see :meth:`calibration_split`)."""
        if self.global_ is None and self.coarse_ is None:
            return
        if len(calibration) < 2:
            self.global_ = self.coarse_ = None
            return
        cfg = self.config
        calibration = list(calibration)
        bank: list[float] = []
        means: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for batch in self._features(calibration, self.backbone_, "calibrating the branches"):
            with torch.inference_mode():
                scores, nearest = patch_scores(batch.rows, self._index, cfg.scoring, cfg.k)
                bank += self._bank_scores(batch, scores, nearest)
                if self.coarse_ is not None:
                    maps += batch_maps(scores, batch, cfg.sigma)
            means.append(input_means(batch))
        if self.global_ is not None:
            self.global_ = self.global_.calibrated(np.array(bank), self.global_.distances(np.concatenate(means)))
        if self.coarse_ is not None:
            coarse = self.coarse_.model._input_results(calibration, maps=True)
            self.coarse_ = self.coarse_.calibrated(maps, [amap for _, amap, _, _ in coarse if amap is not None])

    def _set_thresholds(self, calibration: Sequence[ImageLike]) -> None:
        """The thresholds after a fit: by hand, or from the held-out ``calibration`` images."""
        cfg = self.config
        self.thresholds_ = Thresholds(cfg.threshold, cfg.pixel_threshold, "manual" if cfg.threshold else None)
        if calibration and cfg.threshold_fpr is not None:
            self.calibrate(calibration, cfg.threshold_fpr)

    # ------------------------------------------------------------------ fitting in shards (distributed)
    def calibration_split(self, images: Sequence[ImageLike]) -> tuple[list[ImageLike], list[ImageLike]]:
        """(the images ``fit`` puts into the bank, those it holds out for calibration): a seeded
        ``calibration_share`` with ``threshold_fpr`` (and no manual ``threshold``) or with ``global_branch`` or
        ``coarse_branch`` (when that leaves at least 2 to calibrate them on, else none: the branches are then left
        out), else none."""
        images = list(images)
        cfg = self.config
        thresholds = cfg.threshold_fpr is not None and cfg.threshold is None
        branches = cfg.global_branch or wants_coarse_bank(cfg)
        if not thresholds and (not branches or len(images) < 2):
            return images, []
        keep, held_out = split_calibration(len(images), cfg.calibration_share, cfg.seed)
        if not thresholds and len(held_out) < 2:
            logger.debug(
                "%d training image(s) leave too few to calibrate the global branch and the coarse bank on: fitted "
                "without them; add good images or raise calibration_share",
                len(images),
            )
            return images, []
        return [images[i] for i in keep], [images[i] for i in held_out]

    def fit_shard(self, images: Sequence[ImageLike], n_shards: int) -> list[bytes]:
        """The memory bank of one of ``n_shards`` shards of the bank images (a composable coreset): the greedy
        coreset of the shard's patch features at ``n_shards`` x ``coreset_ratio`` (or ``coreset_size`` rows),
        so the shards together offer the final greedy about ``n_shards`` times the rows it keeps. No images are
        held out and no thresholds set (:meth:`merge_shards` does that). Returns one model file's bytes."""
        cfg = self.config
        ratio = min(1.0, cfg.coreset_ratio * max(1, int(n_shards)))
        part_config = cfg.replace(coreset_ratio=ratio, threshold_fpr=None, threshold=None, pixel_threshold=None)
        return [PatchCore(part_config, **self._runtime())._fit(list(images), [], None, shard=True).to_bytes()]

    def merge_shards(self, parts: Sequence[Sequence[bytes]], calibration: Sequence[ImageLike]) -> PatchCore:
        """Fit from the shards' banks (:meth:`fit_shard`): the greedy coreset over their union, of the size one
        ``fit`` on all of their images would keep (composable coresets: Malkomes et al., NeurIPS 2015), then the
        thresholds from ``calibration`` (:meth:`calibration_split`). Deterministic for the seed and the shards.
        Returns self."""
        if not parts:
            raise PatchCoreError("no shards to merge: fit needs at least one good image")
        states = []
        for i, part in enumerate(parts):
            if len(part) != 1:
                raise PatchCoreError(f"shard {i} holds {len(part)} banks: a PatchCore model has one")
            state = state_from_bytes(part[0], source=f"shard {i}", verify_signature=False)
            if state.kind != self.kind:
                raise PatchCoreError(f"shard {i} holds a {state.kind}, not a {self.kind}")
            states.append(state)
        return self._merge_states(states, calibration)

    def _merge_states(self, states: list[DetectorState], calibration: Sequence[ImageLike]) -> PatchCore:
        """:meth:`merge_shards` on the shards' states (a coarse bank merges its shards' coarse banks so)."""
        cfg = self.config
        started = time.perf_counter()
        banks, means, seen, n_train = [], [], 0, 0
        feature_shape: tuple[int, int] | None = None
        for state in states:
            train = header_dict(state.meta, "train")
            banks.append(torch.from_numpy(np.asarray(state.tensors["memory_bank"], dtype=np.float32)))
            if cfg.global_branch and "global.features" in state.tensors:
                means.append(np.asarray(state.tensors["global.features"], dtype=np.float32))
            seen += int(train["full_bank_size"])
            n_train += int(train["n_train"])
            feature_shape = feature_shape or (int(train["feature_shape"][0]), int(train["feature_shape"][1]))
        union = torch.cat(banks)
        n_select = min(coreset_size(seen, cfg.coreset_ratio, cfg.coreset_size), union.shape[0])
        chosen = self._select(union, n_select, "coreset of the shards")
        self._use_bank(union[torch.from_numpy(np.asarray(chosen))].contiguous())
        # where each row came from is not carried across shards (each shard names its images relative to its
        # own folder): explain() says "not recorded" for a model fitted in shards
        self.bank_source_, self.train_paths_ = None, []
        coreset_seconds = time.perf_counter() - started
        self.backbone_ = self._make_backbone()
        self.feature_shape_ = feature_shape or (1, 1)
        self.n_train_ = n_train
        self.global_ = GlobalBranch.fit(np.concatenate(means)) if means else None
        self.coarse_ = None
        if wants_coarse_bank(cfg):
            coarse = PatchCore(coarse_config(cfg), **self._runtime())
            coarse._merge_states([CoarseBranch.shard_state(state) for state in states], [])
            self.coarse_ = CoarseBranch(coarse)
        self._calibrate_branches(calibration)
        self._set_thresholds(calibration)
        self.fit_stats_ = {  # the merge's own; the shards' work ran elsewhere (the engine times it)
            "coreset_seconds": coreset_seconds,
            "fit_seconds": time.perf_counter() - started,
            "full_bank_size": seen,
            "shards": len(states),
            "union_size": int(union.shape[0]),
        }
        logger.info("memory bank: %d of the shards' %d rows kept (%d patches seen)", n_select, union.shape[0], seen)
        return self

    def partial_fit(self, images: Sequence[ImageLike], *, root: str | os.PathLike | None = None) -> PatchCore:
        """Add good images to a fitted model without re-extracting the old ones. Returns self.

        The new patch features are candidates for the existing coreset: the greedy selection continues
        from the kept rows (:func:`patchcore.core.coreset.greedy_extend`) until the bank holds
        ``coreset_ratio`` of all patch features seen (or ``coreset_size``). Thresholds are kept as they
        are; recalibrate with :meth:`calibrate` when the new images change what "good" looks like. ``root``
        as for :meth:`fit`: the new images' paths are recorded relative to it.
        """
        self._check_fitted()
        images = list(images)
        if not images:
            raise PatchCoreError("no images to add: partial_fit needs at least one good image")
        cfg = self.config
        started = time.perf_counter()
        log = SourceLog(first_image=len(self.train_paths_))
        means: list[np.ndarray] = []
        batches = log.watch(self._features(images, self.backbone_, "extracting features"))
        new = torch.cat([batch.rows.cpu() for batch in self._collect_means(batches, means)])
        feature_seconds = time.perf_counter() - started
        seen = int(self.fit_stats_.get("full_bank_size") or self.memory_bank_.shape[0]) + new.shape[0]
        target = coreset_size(seen, cfg.coreset_ratio, cfg.coreset_size)
        n_add = min(max(0, target - self.memory_bank_.shape[0]), new.shape[0])
        if cfg.coreset_method == "random":
            chosen = random_coreset(new.shape[0], n_add, seed=cfg.seed + self.n_train_)
        else:
            chosen = greedy_extend(
                self.memory_bank_.cpu(), new, n_add, projection_dim=cfg.projection_dim, seed=cfg.seed
            )
        old_source = self.bank_source_
        if old_source is None:  # a model file from before sources were recorded: its rows stay unknown
            old_source = np.full((self.memory_bank_.shape[0], len(SOURCE_COLUMNS)), NOT_RECORDED, np.int32)
        self._use_bank(torch.cat([self.memory_bank_.cpu(), new[torch.from_numpy(chosen)]]))
        self.bank_source_ = np.concatenate([old_source, log.sources(chosen)])
        self.train_paths_ = self.train_paths_ + train_paths(images, root)
        self.n_train_ += len(images)
        if self.global_ is not None and means:  # the Gaussian takes the new images in; its scale is kept
            self.global_ = self.global_.extended(np.concatenate(means))
        if self.coarse_ is not None:  # the coarse bank grows alike; its affines are kept, like the thresholds
            self.coarse_.model.partial_fit(images)
            self.coarse_.model.bank_source_, self.coarse_.model.train_paths_ = None, []
        self.fit_stats_ = {
            "feature_seconds": feature_seconds,
            "coreset_seconds": time.perf_counter() - started - feature_seconds,
            "fit_seconds": time.perf_counter() - started,
            "full_bank_size": seen,
        }
        if self.threshold_ is not None:
            logger.warning("partial_fit keeps the old threshold; recalibrate if the new images differ")
        return self

    @property
    def memory_bank_size(self) -> int:
        """Rows in the memory bank."""
        self._check_fitted()
        return int(self.memory_bank_.shape[0])

    def describe(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _manual_thresholds(self) -> tuple[float | None, float | None]:
        return self.config.threshold, self.config.pixel_threshold

    def _coreset_in_memory(self, batches, n_images: int) -> tuple[torch.Tensor, tuple[int, int], dict, np.ndarray]:
        """All patch features in one preallocated bank, then one coreset over it."""
        cfg = self.config
        started = time.perf_counter()
        bank: torch.Tensor | None = None
        filled = 0
        for batch in batches:
            rows = batch.rows
            if bank is None:  # one preallocated bank: no list of batches plus a concatenated copy
                feature_shape = batch.grids[0]
                bank = torch.empty(n_images * rows.shape[0] // len(batch), rows.shape[1], device=rows.device)
            if filled + rows.shape[0] > bank.shape[0]:  # tiles or non-square inputs: more rows than one per image
                more = torch.empty(max(filled, rows.shape[0]), bank.shape[1], device=bank.device)
                bank = torch.cat([bank[:filled], more])
            bank[filled : filled + rows.shape[0]] = rows  # on the device the features are on (a GPU's bank stays)
            filled += rows.shape[0]
        if bank is None:
            raise PatchCoreError("no patch features were extracted: fit needs at least one good image")
        bank = bank[:filled]
        feature_seconds = time.perf_counter() - started
        started = time.perf_counter()
        n_select = coreset_size(bank.shape[0], cfg.coreset_ratio, cfg.coreset_size)
        chosen = self._select(bank, n_select, "coreset")
        coreset = bank[torch.from_numpy(np.asarray(chosen))].contiguous()
        stats = {
            "feature_seconds": feature_seconds,
            "coreset_seconds": time.perf_counter() - started,
            "full_bank_size": int(bank.shape[0]),
        }
        return coreset, feature_shape, stats, np.asarray(chosen)

    def _on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def _coreset_two_level(self, batches, n_images: int) -> tuple[torch.Tensor, tuple[int, int], dict, np.ndarray]:
        """The greedy coreset of the stream of patch features, never all held at once: the exact greedy when the
        bank has at most ``exact_coreset_rows`` rows (the same bank as :meth:`_coreset_in_memory`), else the
        two-level greedy (:mod:`patchcore.core.two_level`), its shards reduced as the features arrive."""
        cfg = self.config
        assert cfg.exact_coreset_rows is not None
        stream: two_level.TwoLevelCoreset | None = None
        shard_rows = two_level.SHARD_ROWS  # read here, not bound at import: tests shrink it
        started = time.perf_counter()
        for batch in batches:
            rows = batch.rows.cpu()
            if stream is None:
                feature_shape = batch.grids[0]
                keep = two_level.shard_keep(
                    cfg.coreset_ratio, cfg.coreset_size, exact_rows=cfg.exact_coreset_rows, shard_rows=shard_rows
                )
                stream = two_level.TwoLevelCoreset(
                    rows.shape[1],
                    keep,
                    exact_rows=cfg.exact_coreset_rows,
                    shard_rows=shard_rows,
                    projection_dim=cfg.projection_dim,
                    seed=cfg.seed,
                    expected_rows=n_images * (rows.shape[0] // len(batch)),
                )
            stream.add(rows.numpy())
        if stream is None:
            raise PatchCoreError("no patch features were extracted: fit needs at least one good image")
        extraction_seconds = time.perf_counter() - started  # the shards' reductions ran on the way: split below
        n_select = coreset_size(stream.n_seen, cfg.coreset_ratio, cfg.coreset_size)
        with self._bar(n_select, "coreset") as bar:
            coreset, info = stream.finish(n_select, progress=lambda n: bar.update(n - bar.n))
        stats = {
            "feature_seconds": extraction_seconds - info["reduce_seconds"],
            "coreset_seconds": info["reduce_seconds"] + info["finish_seconds"],
            "full_bank_size": int(stream.n_seen),
            "coreset_shards": int(info["n_shards"]),  # 0: the exact greedy over the whole bank
            "coreset_union_size": int(info["n_kept"]),
        }
        return torch.from_numpy(coreset), feature_shape, stats, np.asarray(info["indices"])

    def _coreset_streaming(self, batches) -> tuple[torch.Tensor, tuple[int, int], dict, np.ndarray]:
        """Bounded memory: a fixed buffer reduced by greedy coresets whenever it fills (shards), then a
        greedy coreset over what the shards kept. The budget covers the buffer and the reductions'
        temporaries (measured at up to ~8x the buffer), so the buffer gets an eighth of it."""
        cfg = self.config
        if cfg.coreset_method != "greedy" or cfg.max_bank_memory is None:
            raise PatchCoreError("max_bank_memory needs coreset_method='greedy'")
        stream: StreamingCoreset | None = None
        started = time.perf_counter()
        for batch in batches:
            rows = batch.rows.cpu()
            if stream is None:
                feature_shape = batch.grids[0]
                max_rows = max(2, rows_for_memory(cfg.max_bank_memory * 2**20 // 8, rows.shape[1]))
                stream = StreamingCoreset(rows.shape[1], max_rows, projection_dim=cfg.projection_dim, seed=cfg.seed)
            stream.add(rows.numpy())
        if stream is None:
            raise PatchCoreError("no patch features were extracted: fit needs at least one good image")
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
        return torch.from_numpy(rows), feature_shape, stats, np.asarray(info["indices"])

    def _select(self, bank: torch.Tensor, n_select: int, what: str) -> np.ndarray:
        """Indices of the ``n_select`` rows of ``bank`` (M, D) the configured coreset method keeps."""
        cfg = self.config
        if cfg.coreset_method == "random":
            return np.asarray(random_coreset(bank.shape[0], n_select, seed=cfg.seed))
        # on a GPU the plain loop in torch, where the bank already is; on a CPU the numpy greedy with bounds
        greedy = greedy_coreset if bank.device.type == "cpu" else greedy_coreset_torch
        with self._bar(n_select, what) as bar:
            return np.asarray(
                greedy(
                    bank,
                    n_select,
                    projection_dim=cfg.projection_dim,
                    seed=cfg.seed,
                    progress=lambda n: bar.update(n - bar.n),
                )
            )

    def _bar(self, total: int, what: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=what, unit="patch", disable=None if self.progress else True, leave=False)

    def _make_backbone(self) -> Backbone:
        device = checked_device(self.device)
        return create_backbone(self.config.backbone, self.config.layers, self.config.weights).to(device)

    def _use_bank(self, bank: torch.Tensor) -> None:
        """Adopt ``bank`` (M, D) as the memory bank and build its search index."""
        if self.search not in SEARCH_BACKENDS:
            raise PatchCoreError(f"search={self.search!r} is not one of {', '.join(SEARCH_BACKENDS)}")
        self.memory_bank_ = bank.to(self.device, torch.float32)
        if self.search.startswith("faiss") and self.memory_bank_.device.type != "cpu":
            logger.warning(
                "search=%s is a CPU index: the search runs on the CPU, not on %s; use search='exact' to search on it",
                self.search,
                self.device,
            )
        self._index = build_index(self.memory_bank_, self.search, self.chunk_size, self.config.seed)

    # ------------------------------------------------------------------ features
    def _normalization(self, backbone: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.config.normalization == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return backbone.mean, backbone.std

    @property
    def normalization_(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per RGB channel applied to [0, 1] pixels before the backbone."""
        self._check_fitted()
        return self._normalization(self.backbone_)

    def _inputs(
        self, images: Sequence[ImageLike], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> Iterator[tuple[torch.Tensor, Geometry | TiledGeometry, bool]]:
        """Every model input in order, lazily: (tensor, geometry of its image, whether it is its image's last).

        One input per image, or with tile_size one per tile (the geometry is then the image's TiledGeometry).
        """
        cfg = self.config
        geometry: Geometry | TiledGeometry
        for image in images:
            array = load_image(image, self.max_pixels)
            if cfg.tile_size is not None:
                tiled = geometry = tile_geometry(
                    array.shape[:2],
                    cfg.tile_size,
                    cfg.tile_overlap,
                    cfg.tile_scale,
                    cfg.resize,
                    cfg.crop,
                    cfg.keep_aspect,
                )
                last = len(tiled.boxes) - 1
                for i, x in enumerate(tile_inputs(array, tiled, mean, std)):
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
                "or tile_size (--tile-size) to keep shapes",
                describe(image),
                shape[0],
                shape[1],
                aspect,
                first,
                size,
                size,
            )

    def _features(self, images: Sequence[ImageLike], backbone: Backbone, what: str) -> Iterator[FeatureBatch]:
        """Batches of patch features of the model inputs, in order (see :mod:`.feature_batches`).

        A batch holds up to batch_size consecutive inputs of any shapes, and at most the pixels of batch_size
        square inputs; the backbone runs once per shape in it, and its rows are one (P, D) block.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        mean, std = self._normalization(backbone)
        batch_size = self.resolved_batch_size()
        bar = tqdm(total=len(images), desc=what, unit="img", disable=None if self.progress else True, leave=False)

        def extract(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = x.to(self.device)
                if cfg.input_pool > 1:  # a coarser scale (the coarse bank); maps stay at the input's size
                    x = F.avg_pool2d(x, cfg.input_pool)
                return patch_features(backbone(x), cfg.patch_size, cfg.target_dim)

        def pixels(item: tuple[torch.Tensor, Geometry | TiledGeometry, bool]) -> int:
            return int(item[0].shape[-2] * item[0].shape[-1])

        inputs = self._inputs(images, mean, std)
        try:
            for chunk in take_batches(inputs, pixels, batch_size, batch_size * cfg.input_size**2):
                batch = extract_batch([x for x, _, _ in chunk], [(g, last) for _, g, last in chunk], extract)
                bar.update(sum(last for _, _, last in chunk))
                yield batch
        finally:
            bar.close()

    def extract_features(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Patch features of images: (N, h, w, D) float32 (what the bank is made of); inputs of one shape."""
        self._check_fitted()
        grids = []
        for batch in self._features(list(images), self.backbone_, "features"):
            rows = batch.rows.cpu()
            grids += [r.view(h, w, -1) for r, (h, w) in zip(batch.split(rows), batch.grids)]
        if len({g.shape for g in grids}) > 1:
            raise PatchCoreError(
                "these inputs give feature grids of different sizes (keep_aspect without crop, or tiles): "
                "extract the features of one image at a time"
            )
        return torch.stack(grids).numpy() if grids else np.empty((0, 0, 0, 0), np.float32)

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise not_fitted("PatchCore")

    def infer(self, images: Sequence[ImageLike], *, maps: bool = True) -> Iterator[Inference]:
        """Per image: (image score, anomaly map at input resolution or None, geometry), lazily.

        The map is (S, S) (S = crop or resize); with keep_aspect and no crop, the resized image's (H, W);
        with tiling, the tiles' maps stitched at the scaled image's size and the score the tiles' maximum.
        With a global branch, an input's score is the larger of the bank's and the branch's; with a coarse bank,
        every map pixel is the mean of the fine bank's and the coarse bank's.
        """
        self._check_fitted()
        tile_scores: list[float] = []
        tile_maps: list[np.ndarray] = []
        for score, amap, geometry, last in self._input_results(images, maps):
            if not isinstance(geometry, TiledGeometry):
                yield Inference(score, amap, geometry)
                continue
            tile_scores.append(score)
            if amap is not None:
                tile_maps.append(amap)
            if last:
                yield Inference(max(tile_scores), stitch_maps(tile_maps, geometry) if maps else None, geometry)
                tile_scores, tile_maps = [], []

    def _input_results(
        self, images: Sequence[ImageLike], maps: bool
    ) -> Iterator[tuple[float, np.ndarray | None, Geometry | TiledGeometry, bool]]:
        """Per model input (an image, or a tile), in order: (score, map at input size or None, its image's
        geometry, whether it is its image's last input), the branches combined in."""
        cfg = self.config
        images = list(images)
        # the coarse bank only sharpens maps: scores alone need none of its work
        coarse = self.coarse_.model._input_results(images, maps) if self.coarse_ is not None and maps else None
        for batch in self._features(images, self.backbone_, "scoring"):
            with torch.inference_mode():
                # one search for every patch of every input in the batch, whatever their shapes
                scores, nearest = patch_scores(batch.rows, self._index, cfg.scoring, cfg.k)
                input_maps = batch_maps(scores, batch, cfg.sigma) if maps else None
                batch_scores = self._bank_scores(batch, scores, nearest)
                if self.global_ is not None:
                    batch_scores = self.global_.combined(batch_scores, input_means(batch))
            for i, (geometry, last) in enumerate(batch.owners):
                score = batch_scores[i]
                amap = input_maps[i] if input_maps is not None else None
                if coarse is not None and self.coarse_ is not None and amap is not None:
                    _, coarse_map, _, _ = next(coarse)  # the image score stays the fine bank's
                    assert coarse_map is not None
                    amap = self.coarse_.combined_map(amap, coarse_map)
                yield score, amap, geometry, last

    def _bank_scores(
        self, batch: FeatureBatch, scores: torch.Tensor | None = None, nearest: torch.Tensor | None = None
    ) -> list[float]:
        """Per input of ``batch`` its image score from the bank alone (``scores``, ``nearest``: its patches'
        (P,) scores and nearest bank rows, when already searched)."""
        cfg = self.config
        index = self._index
        if scores is None or nearest is None:
            scores, nearest = patch_scores(batch.rows, index, cfg.scoring, cfg.k)
        return batch_image_scores(
            scores,
            nearest,
            batch,
            lambda s, n, f: image_scores(s, n, f, index, cfg.scoring, cfg.num_neighbors, cfg.image_top_k),
        )

    # ------------------------------------------------------------------ state
    def get_state(self) -> DetectorState:
        self._check_fitted()
        backbone = self.backbone_
        meta: dict[str, Any] = {
            "config": self.config.to_dict(),
            "backbone": {
                "name": backbone.name,
                "layers": list(backbone.layers),
                "weights_sha256": backbone.weights_sha256,
            },
            "train": {
                "n_train": self.n_train_,
                "feature_shape": list(self.feature_shape_),
                "full_bank_size": self.fit_stats_.get("full_bank_size"),
                "seed": self.config.seed,
            },
            "thresholds": self.thresholds_.to_dict(),
        }
        tensors = {"memory_bank": self.memory_bank_.detach().cpu().numpy().copy()}
        if self.global_ is not None:
            meta["global"] = self.global_.meta()
            tensors.update(self.global_.tensors())
        if self.coarse_ is not None:
            meta["coarse"] = self.coarse_.meta()
            tensors.update(self.coarse_.tensors())
        if self.bank_source_ is not None:  # optional: files without it load, and explain() says "not recorded"
            tensors["bank_source"] = self.bank_source_.copy()
            meta["train_paths"] = list(self.train_paths_)
        return DetectorState(self.kind, meta, tensors)

    @classmethod
    def from_state(
        cls, state: DetectorState, *, source: Any = "state", weights: str | None = None, **runtime: Any
    ) -> PatchCore:
        """A fitted PatchCore from its state, checking the backbone here against the one it was fitted with.

        ``weights`` points at the backbone weights when the file recorded in the model is elsewhere on this
        machine; they must hash to what the model was fitted with.
        """
        meta = state.meta
        unknown = sorted(set(runtime) - set(RUNTIME))
        if unknown:
            raise PatchCoreError(f"unknown runtime setting(s) {', '.join(unknown)}: use {', '.join(RUNTIME)}")
        try:
            check_keys(meta, {"config", "backbone", "train", "thresholds", "train_paths", "global", "coarse"}, "model")
            stored = header_dict(meta, "config")
            # files from before the global branch or the coarse bank have no such setting, and no such part
            config = PatchCoreConfig.from_dict({"global_branch": False, "coarse_branch": False, **stored})
            recorded, train = header_dict(meta, "backbone"), header_dict(meta, "train")
            check_keys(recorded, {"name", "layers", "weights_sha256"}, "backbone")
            check_keys(train, {"n_train", "feature_shape", "full_bank_size", "seed"}, "train")
            name, layers, digest = recorded["name"], list(recorded["layers"]), recorded["weights_sha256"]
            n_train, feature_shape, full_bank_size = (
                train["n_train"],
                train["feature_shape"],
                train.get("full_bank_size"),
            )
            if not is_count(n_train, 1):
                raise PatchCoreError(f"n_train={n_train!r} must be a whole number of at least 1")
            if not (
                isinstance(feature_shape, list)
                and len(feature_shape) == 2
                and all(is_count(v, 1) for v in feature_shape)
            ):
                raise PatchCoreError(f"feature_shape={feature_shape!r} must be two positive whole numbers")
            if full_bank_size is not None and not is_count(full_bank_size, 1):
                raise PatchCoreError(f"full_bank_size={full_bank_size!r} must be a whole number or null")
            thresholds = Thresholds.from_dict(meta.get("thresholds"))
            bank = np.asarray(state.tensors["memory_bank"])
            # not "source": that names the file in every message below
            bank_source = state.tensors.get("bank_source")
            if (bank_source is None) != ("train_paths" not in meta):
                raise PatchCoreError("bank_source and train_paths come together")
            paths = (
                check_sources(np.asarray(bank_source), meta["train_paths"], bank.shape[0])
                if bank_source is not None
                else []
            )
        except PatchCoreError as exc:
            raise PatchCoreError(f"{source}: invalid settings in the model ({exc})") from exc
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise PatchCoreError(
                f"{source}: the model's header is incomplete or malformed ({exc!r}); refit or restore it"
            ) from exc
        if weights is not None:
            config = config.replace(weights=str(weights))
        if config.layers is None and tuple(layers) != backbone_spec(config.backbone).default_layers:
            config = config.replace(layers=tuple(layers))  # fitted at the backbone's defaults of an older version
        if bank.ndim != 2 or bank.dtype != np.float32 or bank.shape[0] < 1:
            raise PatchCoreError(f"{source}: memory bank must be a non-empty (M, D) float32 tensor")
        if not np.isfinite(bank).all():
            raise PatchCoreError(f"{source}: the memory bank holds NaN or infinite values: refit or restore the model")
        model = cls(config, **runtime)
        backbone = model._make_backbone()
        if backbone.name != name or list(backbone.layers) != layers:
            raise PatchCoreError(f"{source}: backbone mismatch ({backbone.name} {backbone.layers} vs {name} {layers})")
        if backbone.weights_sha256 != digest:
            raise PatchCoreError(
                f"{source}: the backbone weights here (sha256 {backbone.weights_sha256[:12]}) differ from those "
                f"the model was fitted with ({str(digest)[:12]}): pass the original weights file, or refit"
            )
        expected_dim = config.target_dim or sum(info.channels for info in backbone.feature_info)
        if bank.shape[1] != expected_dim:
            raise PatchCoreError(
                f"{source}: memory bank has {bank.shape[1]} dimensions, the backbone gives {expected_dim}"
            )
        model.global_ = None
        if "global" in meta:
            if not config.global_branch:
                raise PatchCoreError(f"{source}: the model holds a global branch its settings do not ask for: refit")
            try:
                model.global_ = GlobalBranch.from_state(meta["global"], dict(state.tensors), bank.shape[1])
            except PatchCoreError as exc:
                raise PatchCoreError(f"{source}: {exc}: refit or restore the model") from exc
        model.coarse_ = None
        if "coarse" in meta:
            if not config.coarse_branch:
                raise PatchCoreError(f"{source}: the model holds a coarse bank its settings do not ask for: refit")
            try:
                own_state = CoarseBranch.shard_state(state)
            except PatchCoreError as exc:
                raise PatchCoreError(f"{source}: {exc}: refit or restore the model") from exc
            # its own errors name the file and "coarse bank"
            own = PatchCore.from_state(own_state, source=f"{source} (coarse bank)", weights=weights, **runtime)
            try:
                model.coarse_ = CoarseBranch.from_state(meta["coarse"], own, config)
            except PatchCoreError as exc:
                raise PatchCoreError(f"{source}: {exc}: refit or restore the model") from exc
        model.backbone_ = backbone
        model._use_bank(torch.from_numpy(bank.copy()))
        model.n_train_ = n_train
        model.feature_shape_ = (feature_shape[0], feature_shape[1])
        model.fit_stats_ = {"full_bank_size": full_bank_size}
        model.thresholds_ = thresholds
        model.bank_source_ = None if bank_source is None else np.asarray(bank_source).copy()
        model.train_paths_ = paths
        model.provenance_ = dict(state.provenance)
        return model

    # ------------------------------------------------------------------ explanation
    def explain(
        self, image: ImageLike, *, data_root: str | os.PathLike | Sequence[str | os.PathLike] | None = None
    ) -> Explanation:
        """The most anomalous patch of ``image`` and the normal patch nearest to it (see
        :class:`~patchcore.detectors.explain.Explanation`). ``data_root``: the folder (or folders) the
        training images' recorded paths are relative to; the nearest patch's crop is read only from there.
        """
        self._check_fitted()
        cfg = self.config
        pixels = load_image(image, self.max_pixels)
        best: tuple[float, int, int, int, int, int, Any, int] | None = None
        tile = 0
        for batch in self._features([pixels], self.backbone_, "explaining"):
            with torch.inference_mode():
                all_scores, all_nearest = patch_scores(batch.rows, self._index, cfg.scoring, cfg.k)
            parts = zip(batch.split(all_scores.cpu()), batch.split(all_nearest.cpu()), batch.grids, batch.owners)
            for scores, nearest, (h, w), (geometry, _) in parts:
                j = int(torch.argmax(scores))
                if best is None or float(scores[j]) > best[0]:
                    best = (float(scores[j]), tile, j // w, j % w, h, w, geometry, int(nearest[j]))
                tile += 1
        assert best is not None
        patch_score, tile, row, col, h, w, geometry, bank_row = best
        box = cell_box(geometry, tile, (h, w), (row, col))
        roots = [] if data_root is None else [data_root] if isinstance(data_root, (str, os.PathLike)) else data_root
        nearest_info, status, nearest_crop = nearest_patch(
            self.bank_source_, self.train_paths_, bank_row, list(roots), self.max_pixels
        )
        crop_box = context_box(box, pixels.shape[:2])
        return Explanation(
            score=float(self.score_samples([pixels])[0]),
            patch={
                "tile": tile,
                "row": row,
                "col": col,
                "box": list(box),
                "crop_box": list(crop_box),
                "score": patch_score,
            },
            nearest=nearest_info,
            status=status,
            patch_crop=crop(pixels, crop_box),
            nearest_crop=nearest_crop,
        )

    def __repr__(self) -> str:
        defaults = PatchCoreConfig(scoring=self.config.scoring)  # image_top_k's default depends on the mode
        changed = {"scoring": self.config.scoring} if self.config.scoring != PatchCoreConfig.scoring else {}
        changed |= {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != getattr(defaults, f.name)
        }
        fitted = f", fitted on {self.n_train_} images" if hasattr(self, "n_train_") else ""
        return f"PatchCore({', '.join(f'{k}={v!r}' for k, v in changed.items())}){fitted}"


def checked_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a PatchCoreError that says what to use instead."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise PatchCoreError(
            f"device {device!r} is not a torch device: use cpu, or cuda on a machine with a GPU"
        ) from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise PatchCoreError(f"device {device!r}: patchcore runs on cpu, cuda or mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PatchCoreError(f"device {device!r}: no CUDA GPU is available here: use cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise PatchCoreError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PatchCoreError(f"device {device!r}: Apple's MPS is not available here: use cpu")
    return resolved
