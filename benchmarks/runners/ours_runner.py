"""Our ``patchcore.PatchCore``: with the peers' settings (job["settings"] = "peer") or at its own defaults.

"peer": the peers' input size (resize then center crop), feature levels, coreset ratio and ImageNet
mean/std, with the official scoring (squared L2, max patch score). "default": ``PatchCore()`` untouched.
"""

from __future__ import annotations

import time

import _common


class OursAdapter:
    def __init__(self, job: dict) -> None:
        import torch

        try:
            from patchcore import PatchCore
        except ImportError:
            try:  # while the package's __init__ does not export it yet
                from patchcore.model import PatchCore
            except ImportError as exc:
                raise RuntimeError(f"patchcore not importable yet: {exc}") from exc
        self.torch = torch
        if job.get("settings", "peer") == "default":
            self.model = PatchCore(seed=job["seed"])
        else:
            self.model = PatchCore(
                backbone="efficientnet_lite0",
                layers=tuple(job["layers"]),
                resize=job["resize"],
                crop=job["crop"],
                normalization=job["normalization"],
                coreset_ratio=job["coreset_ratio"],
                scoring="official",
                target_dim=job.get("target_dim"),
                seed=job["seed"],
            )
        self.model.batch_size = job["train_batch"]

    def versions(self) -> dict:
        import patchcore

        return {"patchcore": patchcore.__version__, "torch": self.torch.__version__, "config": repr(self.model)}

    def load(self, paths):
        from patchcore.images import load_image, preprocess

        cfg = self.model.config
        mean, std = self.model._normalization(self.model.backbone_)
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
        self.model.batch_size = batch_size
        return self.model.score_samples(paths)


if __name__ == "__main__":
    _common.run(OursAdapter)
