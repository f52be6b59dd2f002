"""The exported model against our torch path, side by side in one run: speed, memory and the same answers.

    python benchmarks/export_bench.py [--settings defaults|peers] [--images 64] [--out DIR]

Fits a model on the textile training images (the defaults, or the peers' settings: 224 px crop of 256,
10% coreset, ImageNet normalisation), exports it to ONNX (and OpenVINO IR where `openvino` is installed),
then scores the same test image files in one fresh process per runtime and batch size (1 and 32): decoding,
preprocessing, scores and anomaly maps at input size, timed after one warm-up batch. ONNX Runtime and
OpenVINO run the graph on at most runtime.PIXELS_PER_RUN input pixels per call, as the runtime does. Each
process reports its time per image and its peak RSS (VmHWM); the ONNX Runtime process has torch blocked, as
on an inspection PC.
Finally the textile protocol (good vs all) is evaluated with both the torch model and the export.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "defaults": {},
    "peers": {"resize": 256, "crop": 224, "coreset_ratio": 0.1, "normalization": "imagenet"},
}

WORKER = r"""
import json, sys, time
kind, model, batch, paths = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if kind == "onnx":  # as on an inspection PC: no torch
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("blocked")
    sys.meta_path.insert(0, NoTorch())
    from patchcore.runtime import OnnxDetector
    detector = OnnxDetector.load(model, batch_size=batch)
    run = lambda images: sum(r.map().size for r in detector.infer(images))  # maps made, not kept
elif kind == "torch":
    from patchcore import load
    detector = load(model, batch_size=batch)
    run = lambda images: sum(r.map().size for r in detector.infer(images))
else:
    import numpy as np, openvino
    from patchcore.imaging import load_image, preprocess_array
    meta = json.loads(open(model + ".json").read())["input"]
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    size = meta["crop"] or meta["resize"]
    prepare = lambda p: preprocess_array(load_image(p), meta["resize"], size, meta["mean"], meta["std"])[0]
    from patchcore.runtime import PIXELS_PER_RUN  # runs as small as the ONNX Runtime path's
    step = max(1, min(batch, PIXELS_PER_RUN // (size * size)))
    def run(images):
        for start in range(0, len(images), step):
            compiled(np.stack([prepare(p) for p in images[start:start + step]]))[compiled.outputs[1]]
run(paths[:batch])  # warm-up: first-call allocations and kernel choices
started = time.perf_counter()
run(paths)
seconds = (time.perf_counter() - started) / len(paths)
# VmHWM, not ru_maxrss: getrusage keeps the parent's peak across fork and exec (this driver's fitted model)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
print(json.dumps({"seconds_per_image": seconds, "peak_rss_mib": rss}))
"""


def measure(kind: str, model: Path, batch: int, paths: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, kind, str(model), str(batch), *paths], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=SETTINGS, default="defaults")
    parser.add_argument("--images", type=int, default=64, help="test images timed per run")
    parser.add_argument("--out", type=Path, default=None, help="keep the model and exports here")
    args = parser.parse_args()

    from patchcore import PatchCore
    from patchcore.datasets import textile
    from patchcore.evaluation.evaluate import evaluate
    from patchcore.export import export
    from patchcore.runtime import OnnxDetector

    out = args.out or Path(tempfile.mkdtemp(prefix="export-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    data = textile()
    started = time.perf_counter()
    model = PatchCore(**SETTINGS[args.settings]).fit(data.train)
    model.save(out / "model.safetensors")
    seconds = time.perf_counter() - started
    print(f"fit on {len(data.train)} textile images in {seconds:.1f} s; bank {model.memory_bank_size} rows")
    started = time.perf_counter()
    export(model, out / "model.onnx")
    print(f"exported in {time.perf_counter() - started:.1f} s: {(out / 'model.onnx').stat().st_size / 2**20:.1f} MiB")
    kinds = ["torch", "onnx"]
    try:
        import openvino  # noqa: F401

        export(model, out / "model.xml", "openvino")
        metadata = OnnxDetector.load(out / "model.onnx").metadata_
        (out / "model.xml.json").write_text(json.dumps(metadata))
        kinds.append("openvino")
    except ImportError:
        print("openvino is not installed: its runtime is skipped")
    paths = [str(s.path) for s in data.test][: args.images]
    results: dict[tuple[str, int], dict[str, float]] = {}
    for batch in (1, 32):
        for kind in kinds:
            file = out / {"torch": "model.safetensors", "onnx": "model.onnx", "openvino": "model.xml"}[kind]
            results[kind, batch] = measure(kind, file, batch, paths)
    print(f"\n{args.settings}, {len(paths)} textile test images, files decoded, scores and maps (input size)")
    print(f"{'runtime':<10} {'batch':>5} {'ms/image':>9} {'peak RSS MiB':>13}")
    for (kind, batch), r in results.items():
        print(f"{kind:<10} {batch:>5} {1e3 * r['seconds_per_image']:>9.1f} {r['peak_rss_mib']:>13.0f}")
    for kind in kinds[1:]:
        for batch in (1, 32):
            ratio = results[kind, batch]["seconds_per_image"] / results["torch", batch]["seconds_per_image"]
            print(f"{kind}_over_torch_b{batch} = {ratio:.2f}  (time per image; below 1 is faster)")

    runtime = OnnxDetector.load(out / "model.onnx")
    torch_metrics, _ = evaluate(model, data)
    onnx_metrics, _ = evaluate(runtime, data)
    print("\ntextile protocol (good vs all):")
    for key in ("image_auroc", "pixel_auroc", "pro"):
        if key in torch_metrics:
            print(f"  {key}: torch {torch_metrics[key]:.4f}  onnx {onnx_metrics[key]:.4f}")
    print(f"\nfiles in {out}")


if __name__ == "__main__":
    main()
