"""Backbone forward per image on the CPU: one pass over the whole batch against the CPU slices, side by side.

    python benchmarks/backbone_batch_bench.py [--backbone efficientnet_lite0] [--sizes 224,384] [--threads 2]

For each input size and batch size, times (best of rounds, alternating the two so that a burst of load hits
both) the backbone forward per image with the whole batch in one pass, and with ``Backbone``'s default
slices of about ``CPU_PIXELS_PER_SLICE`` pixels; prints ``name: value`` lines and the ratio. Also prints
the memory each mode adds at batch 32 (measured in a fresh child process, ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import patchcore.backbones as backbones
from patchcore.backbones import create_backbone


def per_image_seconds(backbone, x: torch.Tensor, batch: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                backbone(x[i : i + batch])
        best = min(best, time.perf_counter() - started)
    return best / len(x)


def child_peak(name: str, size: int, sliced: bool, threads: int) -> float:
    """Peak RSS growth (MiB) of one batch-32 forward in a fresh process. Call it while this process is small:
    a forked child starts with its parent's ru_maxrss."""
    code = (
        "import resource, json, torch, patchcore.backbones as b\n"
        f"torch.set_num_threads({threads})\n"
        f"bb = b.create_backbone({name!r}); x = torch.randn(32, 3, {size}, {size})\n"
        f"b.CPU_PIXELS_PER_SLICE = {backbones.CPU_PIXELS_PER_SLICE if sliced else 10**12}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.inference_mode(): bb(x)\n"
        "print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))\n"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument("--batches", default="1,4,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    peaks = {
        (size, mode): child_peak(args.backbone, size, mode == "sliced", args.threads)
        for size in sizes
        for mode in ("whole", "sliced")
    }
    backbone = create_backbone(args.backbone)
    sliced_pixels = backbones.CPU_PIXELS_PER_SLICE
    for size in sizes:
        x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
        for batch in (int(b) for b in args.batches.split(",")):
            best = {"whole": float("inf"), "sliced": float("inf")}
            for _ in range(args.rounds):  # alternate, keep each one's best
                for mode, pixels in (("whole", 10**12), ("sliced", sliced_pixels)):
                    backbones.CPU_PIXELS_PER_SLICE = pixels
                    best[mode] = min(best[mode], per_image_seconds(backbone, x, batch, 1))
            backbones.CPU_PIXELS_PER_SLICE = sliced_pixels
            for mode, seconds in best.items():
                print(f"{size}px_b{batch}_{mode}_ms_per_image: {1000 * seconds:.2f}")
            print(f"{size}px_b{batch}_speedup_of_slices: {best['whole'] / best['sliced']:.2f}")
        for mode in ("whole", "sliced"):
            print(f"{size}px_b32_{mode}_peak_growth_mib: {peaks[size, mode]:.0f}")
    print(f"peak_rss_mib: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


if __name__ == "__main__":
    main()
