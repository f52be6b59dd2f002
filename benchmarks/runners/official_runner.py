"""The official PatchCore code (amazon-science/patchcore-inspection), driven like its bin/run_patchcore.py.

run_patchcore.py: ``fix_seeds(seed)`` (random, numpy, torch: done by _common.setup, as
patchcore.utils would pull matplotlib); ``PatchCore(device).load(backbone, layers, device, input_shape,
pretrain_embed_dimension=1024, target_embed_dimension=1024, patchsize=3, featuresampler=
ApproximateGreedyCoresetSampler(p, device), anomaly_scorer_num_nn=1, nn_method=FaissNN(on_gpu, workers))``;
``fit(train_loader)``; ``predict(test_loader)`` -> image scores. Its MVTec dataset reads RGB with PIL and
applies Resize(resize), CenterCrop(imagesize), ToTensor, Normalize(ImageNet mean/std); the same
torchvision transforms are built here because its dataset class expects the MVTec folder layout.
The code is not installed: ``job["official_path"]/src`` goes on sys.path.
"""

from __future__ import annotations

import os
import sys
import time

import _common


class _TimedSampler:
    """Wraps the official sampler to time the coreset step inside PatchCore.fit without changing it."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.sizes = inner, 0.0, None

    def run(self, features):
        started = time.perf_counter()
        out = self.inner.run(features)
        self.seconds += time.perf_counter() - started
        self.sizes = (len(features), out.shape[0], out.shape[1])
        return out


class _Batches:
    """An iterable of preprocessed batches, read lazily so decoding counts inside fit as with a DataLoader."""

    def __init__(self, load, paths, batch_size) -> None:
        self.load, self.paths, self.batch_size = load, paths, batch_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self.paths), self.batch_size):
            yield self.load(self.paths[i : i + self.batch_size])


class OfficialAdapter:
    def __init__(self, job: dict) -> None:
        sys.path.insert(0, os.path.join(job["official_path"], "src"))
        import timm
        import torch
        from PIL import Image
        from torchvision import transforms

        import patchcore.common
        import patchcore.patchcore
        import patchcore.sampler

        if job["normalization"] != "imagenet":
            raise ValueError("the official MVTec loader always uses ImageNet mean/std")
        self.torch, self.Image = torch, Image
        self.batch = job["train_batch"]
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        self.transform = transforms.Compose(
            [
                transforms.Resize(job["resize"]),
                transforms.CenterCrop(job["crop"]),
                transforms.ToTensor(),
                transforms.Normalize(mean=mean, std=std),
            ]
        )
        # Its backbones.load() would download weights; build the same timm model and fill it offline.
        backbone = timm.create_model(job["timm_backbone"], pretrained=False)
        _common.load_lite0_weights(backbone, job["weights"])
        backbone.name, backbone.seed = job["timm_backbone"], None
        device = torch.device("cpu")
        self.sampler = _TimedSampler(patchcore.sampler.ApproximateGreedyCoresetSampler(job["coreset_ratio"], device))
        self.model = patchcore.patchcore.PatchCore(device)
        self.model.load(
            backbone=backbone,
            layers_to_extract_from=list(job["layers"]),
            device=device,
            input_shape=(3, job["crop"], job["crop"]),
            pretrain_embed_dimension=1024,
            target_embed_dimension=1024,
            patchsize=3,
            featuresampler=self.sampler,
            anomaly_scorer_num_nn=1,
            nn_method=patchcore.common.FaissNN(False, int(job["threads"])),
        )

    def versions(self) -> dict:
        import faiss
        import timm

        return {"torch": self.torch.__version__, "timm": timm.__version__, "faiss": faiss.__version__}

    def load(self, paths):
        return self.torch.stack([self.transform(self.Image.open(p).convert("RGB")) for p in paths])

    def backbone(self, batch):
        return self.model.forward_modules["feature_aggregator"](batch)

    def fit(self, paths) -> dict:
        started = time.perf_counter()
        self.model.fit(_Batches(self.load, paths, self.batch))
        fit_seconds = time.perf_counter() - started
        full, kept, dim = self.sampler.sizes
        return {
            # the coreset runs inside fit after all features are collected; the faiss index build follows it
            "feature_seconds": fit_seconds - self.sampler.seconds,
            "coreset_seconds": self.sampler.seconds,
            "fit_seconds": fit_seconds,
            "full_bank_size": int(full),
            "bank_size": int(kept),
            "feature_dim": int(dim),
        }

    def score(self, paths, batch_size):
        scores = []
        for i in range(0, len(paths), batch_size):
            batch_scores, _masks = self.model.predict(self.load(paths[i : i + batch_size]))
            scores.extend(float(s) for s in batch_scores)
        return scores


if __name__ == "__main__":
    _common.run(OfficialAdapter)
