"""Our ``patchcore.PatchCore``, in one of the variants that compare.py runs (job["settings"]):

- "peer": the peers' input size (resize then center crop), feature levels, coreset ratio and ImageNet
  mean/std, with the image score and feature dimension given by job["scoring"] and job["target_dim"]:
  compare.py's ``ours`` uses ``scoring="paper"`` (anomalib's score: L2, max patch score, eq. 7 over 9
  neighbours, concatenated channels) and ``ours_official`` uses ``scoring="official"`` (the official
  code's score: squared L2, 1 nearest neighbour, max patch score) with ``target_dim=1024``;
- "default": ``PatchCore()`` untouched (its own input size, normalisation, coreset ratio and scoring).

Prediction (``score``) always computes each image's anomaly map at the model's input resolution with its
score (``model.infer(paths, maps=True)``), from file paths: the same work as the peers' prediction calls
(anomalib's eval forward returns ``pred_score`` and ``anomaly_map``, the official ``predict`` scores and
masks, both at the input resolution, decoding included).
"""

from __future__ import annotations

import time

import _common


class OursAdapter:
    def __init__(self, job: dict) -> None:
        import torch

        try:
            from patchcore import PatchCore
        except ImportError as exc:
            raise RuntimeError(f"patchcore not importable: {exc}") from exc
        self.torch = torch
        if job.get("settings", "peer") == "default":
            self.model = PatchCore(seed=job["seed"])
        else:
            scoring = job["scoring"]
            # Both peers score an image by its max patch score: image_top_k=1, stated rather than left to
            # the mode's default. k: patch score over the nearest bank row only, as both peers (anomalib:
            # n_neighbors=1, official: anomaly_scorer_num_nn=1); num_neighbors: eq. 7's support set,
            # anomalib's 9.
            extra = {"num_neighbors": 9} if scoring == "paper" else {"k": 1}
            self.model = PatchCore(
                backbone="efficientnet_lite0",
                layers=tuple(job["layers"]),
                resize=job["resize"],
                crop=job["crop"],
                normalization=job["normalization"],
                coreset_ratio=job["coreset_ratio"],
                scoring=scoring,
                target_dim=job.get("target_dim"),
                image_top_k=1,
                global_branch=False,  # the peers score with the bank alone, at one scale
                coarse_branch=False,
                seed=job["seed"],
                **extra,
            )
            cfg = self.model.config
            if (cfg.scoring, cfg.image_top_k, cfg.target_dim) != (scoring, 1, job.get("target_dim")):
                raise RuntimeError(f"ours is not configured as asked: {self.model!r}")
        self.model.batch_size = job["train_batch"]

    def versions(self) -> dict:
        import patchcore

        cfg = self.model.config
        return {
            "patchcore": patchcore.__version__,
            "torch": self.torch.__version__,
            "config": repr(self.model),
            "scoring": cfg.scoring,
            "image_top_k": getattr(cfg, "image_top_k", None),
            "target_dim": cfg.target_dim,
        }

    def load(self, paths):
        from patchcore.imaging import load_image, preprocess

        cfg = self.model.config
        mean, std = self.model.normalization_
        return self.torch.stack([preprocess(load_image(p), cfg.resize, cfg.input_size, mean, std)[0] for p in paths])

    def backbone(self, batch):
        return self.model.backbone_(batch)

    def fit(self, paths) -> dict:
        started = time.perf_counter()
        self.model.fit(paths)
        stats = dict(self.model.fit_stats_)
        stats["fit_seconds_outside"] = time.perf_counter() - started  # includes building the backbone
        stats["bank_size"] = int(self.model.memory_bank_.shape[0])
        stats["feature_dim"] = int(self.model.memory_bank_.shape[1])
        return stats

    def score(self, paths, batch_size):
        """Image scores of ``paths``, each computed with its anomaly map at input resolution (as the peers)."""
        self.model.batch_size = batch_size
        side = self.model.config.input_size
        scores = []
        for result in self.model.infer(paths, maps=True):
            if result.input_map is None or tuple(result.input_map.shape[-2:]) != (side, side):
                shape = None if result.input_map is None else tuple(result.input_map.shape)
                raise RuntimeError(f"infer(maps=True) gave a map of shape {shape}, not the {side} x {side} input")
            scores.append(float(result.score))
        return scores


if __name__ == "__main__":
    _common.run(OursAdapter)
