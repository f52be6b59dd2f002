"""Throughput of ``predict`` on the local engine and on Ray (1 and 2 workers), Ray's overhead per image, and
(``--fit``) the distributed fit against the local one on textile; (``--memory``) peak memory against the
number of images.

    python benchmarks/ray_bench.py [--train 100] [--test 200]     # predict: images/s, overhead per image
    python benchmarks/ray_bench.py --fit [--shards 2]             # textile: covering radius and AUROC
    python benchmarks/ray_bench.py --memory [--counts 2000 20000] # tiny images: peak RSS of driver and workers

Predict: a default model (384 px, 1% coreset) fitted on the first ``--train`` textile training images
scores ``--test`` textile test images from their files, writing scores.csv (no maps), through the command
line's code, in this process. Timed: the whole command, best of ``--repeat``; for Ray that includes
starting the actors and loading the model in each (not ``ray.init``, done once before). The local engine
runs with torch's default threads and with one thread (what one Ray worker gets: one CPU, one thread);
Ray's overhead per image is Ray with one worker minus the one-thread local engine, per image; the CPU cost per
image is the CPU time (user + system) of the one-thread local engine.

Fit: ``patchcore fit textile`` locally and with ``--engine ray --shards N``; the covering radius of each
bank over all training patch features (the largest distance of a patch to its nearest bank row: what the
greedy minimises) and the image AUROC of ``patchcore evaluate textile --model``.

Memory: ``--counts`` runs of ``predict --engine ray`` over that many 32 x 32 PNG images (a small model),
each in a fresh process; prints the driver's peak RSS and the largest peak RSS of a scoring worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RAY_INIT = {"include_dashboard": False, "logging_level": "WARNING"}


def timed_predict(model: Path, inputs: list[Path], out: Path, *flags: str) -> float:
    from patchcore.cli import main

    started = time.perf_counter()
    code = main(["predict", str(model), *map(str, inputs), "-o", str(out), *flags])
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"predict failed with exit code {code}")
    return elapsed


def bench_predict(args: argparse.Namespace, work: Path) -> None:
    import ray
    import torch

    from patchcore import PatchCore
    from patchcore.datasets import textile

    data = textile()
    model = work / "model.safetensors"
    PatchCore().fit(data.train[: args.train]).save(model)
    inputs = [sample.path for sample in data.test[: args.test]]
    n = len(inputs)
    best: dict[str, float] = {}
    threads = torch.get_num_threads()
    cpu_seconds = 1e9
    ray.init(num_cpus=os.cpu_count(), **RAY_INIT)
    try:
        for repeat in range(args.repeat):
            best["local"] = min(best.get("local", 1e9), timed_predict(model, inputs, work / f"local{repeat}"))
            torch.set_num_threads(1)
            cpu = time.process_time()
            one = timed_predict(model, inputs, work / f"one{repeat}")
            cpu_seconds = min(cpu_seconds, time.process_time() - cpu)
            torch.set_num_threads(threads)
            best["local, 1 thread"] = min(best.get("local, 1 thread", 1e9), one)
            for workers in (1, 2):
                name = f"ray, {workers} worker{'s' * (workers > 1)}"
                flags = ("--engine", "ray", "--num-workers", str(workers))
                best[name] = min(
                    best.get(name, 1e9), timed_predict(model, inputs, work / f"ray{workers}{repeat}", *flags)
                )
    finally:
        ray.shutdown()
    print(f"predict, {n} textile images, default model fitted on {args.train} images, {os.cpu_count()} CPUs:")
    for name, seconds in best.items():
        print(f"  {name:>18}: {n / seconds:6.1f} images/s  ({1000 * seconds / n:6.1f} ms per image)")
    overhead = (best["ray, 1 worker"] - best["local, 1 thread"]) / n
    print(f"  Ray's overhead per image (1 worker against the 1-thread local engine): {1000 * overhead:.1f} ms")
    print(f"  CPU time per image (1-thread local engine, user + system): {1000 * cpu_seconds / n:.1f} ms")


def covering_radius(features: np.ndarray, bank: np.ndarray, block: int = 8192) -> float:
    import torch

    rows = torch.from_numpy(features)
    bank_t = torch.from_numpy(bank)
    worst = 0.0
    for start in range(0, rows.shape[0], block):
        worst = max(worst, float(torch.cdist(rows[start : start + block], bank_t).min(dim=1).values.max()))
    return worst


def bench_fit(args: argparse.Namespace, work: Path) -> None:
    from patchcore.cli import main
    from patchcore.datasets import textile
    from patchcore.detectors import load

    results = {}
    for name, flags in (
        ("local", []),
        (f"ray, {args.shards} shards", ["--engine", "ray", "--shards", str(args.shards)]),
    ):
        model = work / f"{name.split(',')[0]}.safetensors"
        started = time.perf_counter()
        if main(["fit", "textile", "-o", str(model), *flags]) != 0:
            raise SystemExit(f"fit ({name}) failed")
        fit_seconds = time.perf_counter() - started
        out = work / f"eval-{name.split(',')[0]}"
        if main(["evaluate", "textile", "-o", str(out), "--model", str(model)]) != 0:
            raise SystemExit(f"evaluate ({name}) failed")
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = (model, fit_seconds, metrics["image_auroc"], metrics["memory_bank_size"])
    reference = load(results["local"][0])
    train = textile().train
    features = reference.extract_features(train).reshape(-1, reference.memory_bank_.shape[1])
    radii = {name: covering_radius(features, load(model).memory_bank_.numpy()) for name, (model, *_) in results.items()}
    print(f"fit on textile ({len(train)} images, {features.shape[0]:,} patch features):")
    for name, (_, seconds, auroc, size) in results.items():
        print(
            f"  {name:>14}: bank {size:,} rows, covering radius {radii[name]:.4f}, "
            f"image AUROC {auroc:.4f}, {seconds:.1f} s"
        )
    ray_name = [name for name in results if name != "local"][0]
    ratio, difference = radii[ray_name] / radii["local"], results[ray_name][2] - results["local"][2]
    print(f"  radius ratio {ratio:.3f}, AUROC difference {difference:+.4f}")


def peak_rss_kib(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_child(count: int, work: Path) -> None:
    """One run (in its own process): predict --engine ray over ``count`` tiny images; prints peak RSS."""
    import resource

    import ray
    from PIL import Image

    from patchcore import PatchCore

    rng = np.random.default_rng(0)
    folder = work / f"images{count}"
    folder.mkdir(exist_ok=True)
    base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i in range(count):
        Image.fromarray(np.roll(base, i % 32, axis=1)).save(folder / f"{i:06d}.png")
    model = work / "tiny.safetensors"
    if not model.exists():
        PatchCore(resize=32, coreset_ratio=0.1).fit([base] * 4).save(model)
    workers_peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal workers_peak
        while not done.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    with contextlib.suppress(OSError):
                        if b"MapWorker" in (proc / "cmdline").read_bytes():
                            workers_peak = max(workers_peak, peak_rss_kib(proc.name))
            time.sleep(0.5)

    ray.init(num_cpus=2, object_store_memory=200 * 2**20, **RAY_INIT)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        timed_predict(model, [folder], work / f"out{count}", "--engine", "ray", "--num-workers", "2")
    finally:
        done.set()
        ray.shutdown()
    seconds = time.perf_counter() - started
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "images": count,
                "driver_peak_mib": driver / 1024,
                "worker_peak_mib": workers_peak / 1024,
                "seconds": seconds,
            }
        )
    )


def bench_memory(args: argparse.Namespace, work: Path) -> None:
    print("predict --engine ray, 2 workers, 32 x 32 PNG images, a small model; peak RSS per run (fresh processes):")
    for count in args.counts:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(count), "--work", str(work)],
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"  {record['images']:>7,} images: driver {record['driver_peak_mib']:7.0f} MiB, "
            f"largest worker {record['worker_peak_mib']:6.0f} MiB, {record['images'] / record['seconds']:.0f} images/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.memory_child:
            memory_child(args.memory_child, work)
        elif args.memory:
            bench_memory(args, work)
        elif args.fit:
            bench_fit(args, work)
        else:
            bench_predict(args, work)


if __name__ == "__main__":
    main()
