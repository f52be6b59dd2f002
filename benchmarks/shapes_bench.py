"""Cost per input pixel of keep-aspect and tiled inputs against the square default, side by side in one run.

    python benchmarks/shapes_bench.py [--train 20] [--test 32] [--rounds 3] [--reps 2] [--equal-bank]

Data: seeded synthetic images of varied size and aspect made from the textile images (conformal-clip-data):
each a random crop of a 250 x 250 image, resized to 103-632 px wide and 222-403 px high (like the set of
parts, about 270 x 324 px, on which the issue measured the cliff). Every round draws fresh training and
test images (new shapes, as in use) and runs the three modes on them, in a rotating order:

- ``square``: the default (every image stretched to 384 x 384);
- ``keep-aspect``: ``keep_aspect=True``, no crop (shorter side 384, the aspect kept: each image its own shape);
- ``tiled``: ``tile_size`` (256) tiles with the default 25% overlap, each resized to 384 x 384.

Per round, each mode is fitted (the fit's feature extraction timed too), then prediction runs ``--reps``
times per mode, the modes interleaved: ``infer(maps=True)`` (the score and the anomaly map at input size of
every image, from decoded arrays) at batch 32 and batch 1. An "input pixel" is a pixel the backbone sees
(the 384 x 384 square, the keep-aspect image, or every tile): the figures are seconds per megapixel of model
input, wall clock (``_s_per_mp``) and process CPU time (``_cpu_s_per_mp``; with ``--threads 1`` the steadiest
measure on a shared machine), each the best of all rounds, and each mode's ratio to the square default.

The banks are 1% of each mode's patches (the default ratio): keep-aspect and tiled inputs hold more patches
per image, so their banks are larger, each patch's search costs more and the greedy coreset (whose cost grows
with the bank times its size) much more; ``--equal-bank`` also fits every mode with the square default's bank
size, which separates that effect from the cost of the shapes themselves.

Also printed: the bank sizes, input megapixels per image, the CPU utilisation of prediction at batch 32
(process CPU seconds over wall seconds, the highest seen: 2.0 is both cores busy, on an otherwise idle
machine) and the largest relative difference of a score between batch 1 and batch 32 (must be 0: batching
does not change scores).
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


def rotated(names: list[str], k: int) -> list[str]:
    """``names`` started at position k: the order of the modes changes from round to round."""
    k %= len(names)
    return names[k:] + names[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20, help="training images per round (default 20)")
    parser.add_argument("--test", type=int, default=32, help="test images per round (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of fresh images; every figure is the best")
    parser.add_argument("--reps", type=int, default=2, help="predictions of each mode per round (default 2)")
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
    notes: dict[str, list[float]] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, np.inf), value)

    logging.basicConfig(level=logging.ERROR)  # square mode warns that these images differ in aspect
    warm = varied_images(pool[:4], np.random.default_rng([args.seed, 999]))
    for settings in modes.values():  # load weights and warm the kernels once, outside every timing
        list(PatchCore(**settings).fit(warm[:2]).infer(warm[2:]))

    started = time.perf_counter()
    for round_ in range(args.rounds):
        rng = np.random.default_rng([args.seed, round_])
        picked = rng.choice(len(pool), args.train + args.test, replace=False)
        images = varied_images([pool[i] for i in picked], rng)
        train, test = images[: args.train], images[args.train :]
        variants = [(m, modes[m]) for m in rotated(list(modes), round_)]
        if args.equal_bank:  # after the square, whose bank size they take
            variants += [(f"{m}_equal_bank", {**modes[m], "coreset_size": None}) for m in modes if m != "square"]
        fitted: dict[str, tuple[PatchCore, float]] = {}
        for name, settings in variants:
            if "coreset_size" in settings:
                settings = {**settings, "coreset_size": fitted["square"][0].memory_bank_size}
            model = PatchCore(**settings, seed=args.seed)
            train_mp, test_mp = megapixels(train, model.config), megapixels(test, model.config)
            wall, _, _ = timed(model.fit, train)
            keep(f"{name}_fit_s_per_mp", wall / train_mp)
            keep(f"{name}_features_s_per_mp", model.fit_stats_["feature_seconds"] / train_mp)
            notes.setdefault(f"{name}_bank_rows", []).append(model.memory_bank_size)
            notes.setdefault(f"{name}_input_mp_per_image", []).append((train_mp + test_mp) / len(images))
            fitted[name] = (model, test_mp)
        # predictions interleaved mode by mode, several times: each mode meets the same load on a shared machine
        for rep in range(args.reps):
            for name in rotated(list(fitted), round_ + rep):
                model, test_mp = fitted[name]
                scores = {}
                for batch in (32, 1):
                    model.set_params(batch_size=batch)
                    wall, cpu, results = timed(list[Inference], model.infer(test, maps=True))
                    scores[batch] = np.array([r.score for r in results])
                    keep(f"{name}_predict_b{batch}_s_per_mp", wall / test_mp)
                    keep(f"{name}_predict_b{batch}_cpu_s_per_mp", cpu / test_mp)
                    if batch == 32:
                        notes.setdefault(f"{name}_cpu_utilisation_b32", []).append(cpu / wall)
                drift = float(np.max(np.abs(scores[1] - scores[32]) / np.abs(scores[1])))
                notes.setdefault(f"{name}_max_score_diff_b1_b32", []).append(drift)
        print(f"== after round {round_} ({time.perf_counter() - started:.0f} s)", flush=True)
        report(best, notes)


def report(best: dict[str, float], notes: dict[str, list[float]]) -> None:
    """Every figure so far, one ``name: value`` line each."""
    for key in ("fit", "features", "predict_b1", "predict_b32", "predict_b1_cpu", "predict_b32_cpu"):
        for name in [v for v in best if v.endswith(f"_{key}_s_per_mp")]:
            print(f"{name}: {best[name]:.4f}")
        square = best[f"square_{key}_s_per_mp"]
        for name in [v for v in best if v.endswith(f"_{key}_s_per_mp") and not v.startswith("square_")]:
            print(f"{name.removesuffix('_s_per_mp')}_over_square: {best[name] / square:.2f}")
    for name, values in notes.items():
        if name.endswith("_cpu_utilisation_b32"):
            print(f"{name}: {max(values):.2f} (the highest of {len(values)}; 2.0 = both cores busy)")
        elif name.endswith("_max_score_diff_b1_b32"):
            print(f"{name}: {max(values):.2e}")
        else:
            print(f"{name}: {np.mean(values):.4g} (mean of the rounds)")
    print(flush=True)


if __name__ == "__main__":
    main()
