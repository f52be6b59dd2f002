"""CPU against CUDA, side by side in one run: fit and predict on textile at the defaults, and the same answers.

    python benchmarks/gpu_bench.py [--train 100] [--test 64] [--rounds 2] [--gpu cuda]

Per round, in alternating order, each device fits a default model on the first ``--train`` textile training
images and predicts ``--test`` test images (nominal, local and global defects in turn) from their files:
``infer(maps=True)`` (score and anomaly map at input size of every image), at batch 1 and batch 32. Every
figure is the best of the rounds; ``*_speedup`` is the CPU's time over the GPU's. Parity: the CPU-fitted
model loaded on the GPU must give the CPU's scores (``predict_parity_max_rel``, float rounding: ~1e-6); the
GPU-fitted model's bank may differ by near-ties of the greedy selection (``fit_*`` lines). Also the image
AUROC of both fits. The CUDA timings wait for the device (``torch.cuda.synchronize``) before the clock stops.

``--gpu cpu`` runs the whole script without a GPU (both columns on the CPU): a dry run of the code paths.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.datasets import textile
from patchcore.evaluation.metrics import auroc

T = TypeVar("T")


def timed(device: str, call: Callable[..., T], *args: Any) -> tuple[float, T]:
    """(wall seconds, result) of ``call(*args)``, the device's queued work included."""
    started = time.perf_counter()
    result = call(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpu", default="cuda", help="the device against the CPU (cpu: a dry run without a GPU)")
    args = parser.parse_args()
    if args.gpu.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench: no CUDA GPU visible to torch: run it on a machine with one, or pass --gpu cpu")
        print(f"device: {torch.cuda.get_device_name(args.gpu)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"cpu_threads: {torch.get_num_threads()}")
    data = textile()
    train = data.train[: args.train]
    by_group = [[s for s in data.test if s.defect_type == g] for g in ("good", "local", "global")]
    test = [group[i] for i in range(args.test // 3 + 1) for group in by_group][: args.test]
    paths, labels = [s.path for s in test], np.array([s.label for s in test])
    devices = {"cpu": "cpu", "gpu": args.gpu}
    best: dict[str, float] = {}
    models: dict[str, PatchCore] = {}
    scores: dict[str, np.ndarray] = {}
    warm = PatchCore(device=args.gpu).fit(train[:2])  # CUDA context, kernels and weights, outside the timings
    list(warm.infer(paths[:2]))

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, np.inf), seconds)

    for round_ in range(args.rounds):
        for name in ("cpu", "gpu") if round_ % 2 == 0 else ("gpu", "cpu"):
            device = devices[name]
            seconds, model = timed(device, PatchCore(device=device).fit, train)
            keep(f"{name}_fit_seconds", seconds)
            keep(f"{name}_coreset_seconds", model.fit_stats_["coreset_seconds"])
            models[name] = model
            for batch in (1, 32):
                model.set_params(batch_size=batch)
                seconds, results = timed(device, list[Any], model.infer(paths, maps=True))
                keep(f"{name}_predict_b{batch}_ms_per_image", 1000 * seconds / len(paths))
                scores[name] = np.array([r.score for r in results])
        print(f"round {round_}: done", flush=True)

    figures = {"fit": "fit_seconds", "coreset": "coreset_seconds"}
    figures |= {f"predict_b{b}": f"predict_b{b}_ms_per_image" for b in (1, 32)}
    for short, key in figures.items():
        cpu, gpu = best[f"cpu_{key}"], best[f"gpu_{key}"]
        print(f"cpu_{key}: {cpu:.3f}\ngpu_{key}: {gpu:.3f}\n{short}_speedup: {cpu / gpu:.1f}")
    cpu_model = models["cpu"]
    on_gpu = PatchCore.from_state(cpu_model.get_state(), device=args.gpu)
    same_model = on_gpu.score_samples(paths)
    print(f"predict_parity_max_rel: {np.max(np.abs(same_model - scores['cpu']) / np.abs(scores['cpu'])):.2e}")
    gpu_model = models["gpu"]
    print(f"fit_bank_rows_cpu_gpu: {cpu_model.memory_bank_size} {gpu_model.memory_bank_size}")
    print(f"fit_scores_max_rel: {np.max(np.abs(scores['gpu'] - scores['cpu']) / np.abs(scores['cpu'])):.2e}")
    print(f"image_auroc_cpu_gpu: {auroc(labels, scores['cpu']):.4f} {auroc(labels, scores['gpu']):.4f}")
    if args.gpu.startswith("cuda"):
        print(f"gpu_peak_memory_mib: {torch.cuda.max_memory_allocated(args.gpu) / 2**20:.0f}")


if __name__ == "__main__":
    main()
