"""Cost per input pixel of keep-aspect and tiled inputs against the square default, side by side in one run.

    python benchmarks/shapes_bench.py [--train 30] [--test 24] [--rounds 3] [--tile-size 256] [--equal-bank]

Data: seeded synthetic images of varied size and aspect made from the textile images (conformal-clip-data):
each a random crop of a 250 x 250 image, resized to 103-632 px wide and 222-403 px high (like the set of
parts, about 270 x 324 px, on which the issue measured the cliff). Every round draws fresh training and
test images (new shapes, as in use) and runs the three modes on them, in a rotating order:

- ``square``: the default (every image stretched to 384 x 384);
- ``keep-aspect``: ``keep_aspect=True``, no crop (shorter side 384, the aspect kept: each image its own shape);
- ``tiled``: ``tile_size`` (256) tiles with the default 25% overlap, each resized to 384 x 384.

Per mode: ``fit`` (its feature extraction alone too), and prediction, ``infer(maps=True)`` (the score and the
anomaly map at input size of every image, from decoded arrays), at batch 1 and batch 32. An "input pixel" is
a pixel the backbone sees (the 384 x 384 square, the keep-aspect image, or every tile), so the figures are
seconds per megapixel of model input, best of the rounds, and each mode's ratio to the square default. The
banks are 1% of each mode's patches (the default ratio): keep-aspect and tiled inputs hold more patches per
image, so their banks are larger and each patch's search costs more; ``--equal-bank`` also fits every mode
with the square default's bank size, which separates that effect from the cost of the shapes themselves.

Also printed: the bank sizes, input megapixels per image, the CPU utilisation of prediction at batch 32
(process CPU seconds over wall seconds: 2.0 is both cores busy) and the largest relative difference of a
score between batch 1 and batch 32 (batching must not change scores).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from patchcore import PatchCore
from patchcore.config import PatchCoreConfig
from patchcore.datasets import textile
from patchcore.detectors.base import Inference
from patchcore.imaging import geometry_for, load_image, tile_geometry

WIDTHS, HEIGHTS = (103, 632), (222, 403)
T = TypeVar("T")


def varied_images(paths: list, rng: np.random.Generator) -> list[np.ndarray]:
    """Each image: a random crop (at least 60% of each side) resized to a random size in WIDTHS x HEIGHTS."""
    out = []
    for path in paths:
        image = Image.fromarray((load_image(path) * 255).round().astype(np.uint8))
        side_w, side_h = image.size
        cw, ch = (int(rng.integers(int(0.6 * s), s + 1)) for s in (side_w, side_h))
        left, top = int(rng.integers(0, side_w - cw + 1)), int(rng.integers(0, side_h - ch + 1))
        size = (int(rng.integers(WIDTHS[0], WIDTHS[1] + 1)), int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1)))
        out.append(np.asarray(image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR)))
    return out


def input_pixels(shape: tuple[int, int], cfg: PatchCoreConfig) -> int:
    """Pixels the backbone sees for an image of ``shape`` (H, W): its model input, or all its tiles'."""
    if cfg.tile_size is not None:
        tiled = tile_geometry(
            shape, cfg.tile_size, cfg.tile_overlap, cfg.tile_scale, cfg.resize, cfg.crop, cfg.keep_aspect
        )
        return sum(t.input_shape[0] * t.input_shape[1] for t in tiled.tiles)
    crop = cfg.crop if cfg.keep_aspect else cfg.input_size
    h, w = geometry_for(shape, cfg.resize, crop, cfg.keep_aspect).input_shape
    return h * w


def megapixels(images: list[np.ndarray], cfg: PatchCoreConfig) -> float:
    return sum(input_pixels(image.shape[:2], cfg) for image in images) / 1e6


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, float, T]:
    """(wall seconds, process CPU seconds, result) of ``call(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = call(*args, **kwargs)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=30, help="training images per round (default 30)")
    parser.add_argument("--test", type=int, default=24, help="test images per round (default 24)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; every figure is the best of them")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: both cores here)")
    parser.add_argument("--equal-bank", action="store_true", help="also fit every mode at the square's bank size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = textile()
    pool = [*data.train, *(s.path for s in data.test)]
    modes = {"square": {}, "keep_aspect": {"keep_aspect": True}, "tiled": {"tile_size": args.tile_size}}
    best: dict[str, float] = {}
    notes: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, np.inf), value)

    logging.basicConfig(level=logging.ERROR)  # square mode warns that these images differ in aspect
    warm = varied_images(pool[:4], np.random.default_rng([args.seed, 999]))
    for settings in modes.values():  # load weights and warm the kernels once, outside every timing
        list(PatchCore(**settings).fit(warm[:2]).infer(warm[2:]))

    for round_ in range(args.rounds):
        rng = np.random.default_rng([args.seed, round_])
        picked = rng.choice(len(pool), args.train + args.test, replace=False)
        images = varied_images([pool[i] for i in picked], rng)
        train, test = images[: args.train], images[args.train :]
        names = list(modes)
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        variants = [(m, modes[m]) for m in order]
        if args.equal_bank:
            variants += [(f"{m}_equal_bank", {**modes[m], "equal_bank": True}) for m in order if m != "square"]
        square_bank: int | None = None
        for name, settings in sorted(variants, key=lambda v: "equal_bank" in v[1]):  # square's bank size first
            settings = dict(settings)
            if settings.pop("equal_bank", False):
                settings["coreset_size"] = square_bank
            model = PatchCore(**settings, seed=args.seed)
            cfg = model.config
            train_mp, test_mp = megapixels(train, cfg), megapixels(test, cfg)
            wall, _, _ = timed(model.fit, train)
            if name == "square":
                square_bank = model.memory_bank_size
            keep(f"{name}_fit_s_per_mp", wall / train_mp)
            keep(f"{name}_features_s_per_mp", model.fit_stats_["feature_seconds"] / train_mp)
            notes[f"{name}_bank_rows_round{round_}"] = model.memory_bank_size
            notes[f"{name}_input_mp_per_image_round{round_}"] = (train_mp + test_mp) / len(images)
            scores = {}
            for batch in (1, 32):
                model.set_params(batch_size=batch)
                wall, cpu, results = timed(list[Inference], model.infer(test, maps=True))
                scores[batch] = np.array([r.score for r in results])
                keep(f"{name}_predict_b{batch}_s_per_mp", wall / test_mp)
                if batch == 32:
                    notes[f"{name}_cpu_utilisation_b32_round{round_}"] = cpu / wall
            drift = float(np.max(np.abs(scores[1] - scores[32]) / np.abs(scores[1])))
            notes[f"{name}_max_score_diff_b1_b32"] = max(notes.get(f"{name}_max_score_diff_b1_b32", 0.0), drift)
            print(f"round {round_} {name}: done", flush=True)

    for key in ("fit", "features", "predict_b1", "predict_b32"):
        for name in [v for v in best if v.endswith(f"_{key}_s_per_mp")]:
            print(f"{name}: {best[name]:.4f}")
        square = best[f"square_{key}_s_per_mp"]
        for name in [v for v in best if v.endswith(f"_{key}_s_per_mp") and not v.startswith("square_")]:
            print(f"{name.removesuffix('_s_per_mp')}_over_square: {best[name] / square:.2f}")
    for name, value in notes.items():
        print(f"{name}: {value:.3g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
