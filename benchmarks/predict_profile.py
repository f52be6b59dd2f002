"""Where prediction time goes, stage by stage, against the backbone forward alone.

    python benchmarks/predict_profile.py [--settings default|peers] [--batch 1 32] [--train 200] [--test 64]

Fits one model on textile training images (the defaults, or the peers' settings of benchmarks/README.md:
256 -> 224 px, blocks.2 + blocks.4, 10% coreset, ImageNet mean/std, scoring "paper"), then, for each batch
size, runs ``model.infer(paths, maps=True)`` (from file paths, maps at input resolution: what compare.py
times) under cProfile and prints the cumulative milliseconds per image of each stage, with the backbone
forward alone on the same images preprocessed in advance (the floor compare.py divides by). The two are
timed in alternation and each keeps its best of ``--rounds`` rounds. Stages are matched by function name,
so the script runs unchanged on older versions of the package (stages an older version lacks print 0).
cProfile adds a little overhead per Python call; the ``infer`` row is timed without it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from patchcore import PatchCore
from patchcore.config import PatchCoreConfig
from patchcore.datasets import textile
from patchcore.imaging import load_image, preprocess

SETTINGS = {
    "default": PatchCoreConfig(),
    "peers": PatchCoreConfig(
        resize=256,
        crop=224,
        layers=("blocks.2", "blocks.4"),
        coreset_ratio=0.1,
        normalization="imagenet",
        scoring="paper",
        image_top_k=1,
        global_branch=False,
        coarse_branch=False,
    ),
}
# stage -> (file suffix, function name) pairs whose cumulative time it is (the first one found counts)
STAGES = {
    "decode": (("imaging/decode.py", "load_image"),),
    "preprocess": (("imaging/tensors.py", "preprocess"), ("imaging/preprocess.py", "preprocess")),
    "backbone": (("backbones/__init__.py", "forward"),),  # Backbone.forward, as infer calls it
    "patch features": (("core/features.py", "patch_features"),),
    "search": (("core/scoring.py", "patch_scores"),),
    "image scores": (("core/scoring.py", "image_scores"), ("core/scoring.py", "image_score")),
    "maps": (("core/maps.py", "anomaly_maps"),),
}


def stage_times(stats: pstats.Stats, n_images: int) -> dict[str, float]:
    """Cumulative ms per image of each stage from a cProfile run."""
    entries = stats.stats.items()  # type: ignore[attr-defined]
    out = {}
    for stage, keys in STAGES.items():
        found = [
            ct
            for suffix, name in keys
            for (path, _, function), (_, _, _, ct, _) in entries
            if function == name and path.replace("\\", "/").endswith(suffix)
        ]
        out[stage] = 1000.0 * (found[0] if found else 0.0) / n_images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = textile()
    model = PatchCore(SETTINGS[args.settings]).fit(data.train[: args.train])
    paths = [str(sample.path) for sample in data.test[: args.test]]
    cfg = model.config
    mean, std = model.normalization_
    inputs = [preprocess(load_image(p), cfg.resize, cfg.input_size, mean, std)[0] for p in paths]
    print(f"settings: {args.settings}, bank {tuple(model.memory_bank_.shape)}, {len(paths)} test images")
    for size in args.batch:
        batches = [torch.stack(inputs[i : i + size]) for i in range(0, len(inputs), size)]
        model.batch_size = size
        list(model.infer(paths[:size], maps=True))  # warm-up: lazy initialisation is not timed
        best_infer = best_backbone = float("inf")
        for _ in range(args.rounds):
            started = time.perf_counter()
            list(model.infer(paths, maps=True))
            best_infer = min(best_infer, time.perf_counter() - started)
            started = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    model.backbone_(batch)
            best_backbone = min(best_backbone, time.perf_counter() - started)
        profiler = cProfile.Profile()
        profiler.enable()
        list(model.infer(paths, maps=True))
        profiler.disable()
        stages = stage_times(pstats.Stats(profiler), len(paths))
        infer_ms, backbone_ms = 1000 * best_infer / len(paths), 1000 * best_backbone / len(paths)
        print(f"batch {size}:")
        for stage, ms in stages.items():
            print(f"  {stage:15s} {ms:7.2f} ms/image (profiled)")
        print(f"  {'infer':15s} {infer_ms:7.2f} ms/image")
        print(f"  {'backbone alone':15s} {backbone_ms:7.2f} ms/image")
        print(f"predict_over_backbone_{args.settings}_b{size}: {infer_ms / backbone_ms:.2f}")


if __name__ == "__main__":
    main()
