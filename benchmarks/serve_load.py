"""Load on ``patchcore serve`` against ``patchcore predict`` on the same images, in one run, on 127.0.0.1 only.

    python benchmarks/serve_load.py [--model MODEL] [--clients 8] [--duration 60] [--images 64]

Without --model, a model is fitted on the first 100 textile nominal images with every default (written to
a temporary folder). The test images are textile nominal, local and global images (a fixed, sorted share).

1. ``patchcore predict MODEL IMAGES -o OUT`` on all images and on one image: its rate is
   (N - 1) / (t_N - t_1), so interpreter start, imports and model load (the same in both) cancel out.
2. ``patchcore serve MODEL`` on a free 127.0.0.1 port with a token; ``--clients`` threads each post one
   image per request to ``/v1/predict`` for ``--duration`` seconds (bounded by ``--max-requests`` too).
   Half-way, one image is marked good (``/v1/feedback``): the update runs under the load, and the run
   counts failed requests (any status but 200, or a transport error) before, during and after it.

Prints images/s of both and their ratio, p50/p95 latency, errors and the feedback update's duration, and
writes them as JSON with --out. Timings depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: object) -> float:
    """Run ``patchcore ARGS`` and return its wall time; fail loudly."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "patchcore.cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"patchcore {' '.join(map(str, args))} failed:\n{result.stderr}")
    return time.perf_counter() - started


def textile_images(n: int) -> list[Path]:
    from conformal_clip_data import global_dir, local_dir, nominal_dir

    pools = [sorted(Path(folder()).glob("*.jpg")) for folder in (nominal_dir, local_dir, global_dir)]
    pools[0] = pools[0][800:]  # never the training images
    per = -(-n // 3)
    return [p for pool in pools for p in pool[:per]][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a fitted model (default: fit one on 100 textile images)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (at most 600)")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=64, help="test images (cycled by the clients)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.clients <= 64:
        raise SystemExit("--duration must lie in (0, 600] and --clients in [1, 64]")
    import httpx

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = Path(args.model) if args.model else work / "model.safetensors"
    if not args.model:
        from conformal_clip_data import nominal_dir

        train = work / "train"
        train.mkdir()
        for path in sorted(Path(nominal_dir()).glob("*.jpg"))[:100]:
            (train / path.name).symlink_to(path)
        print(f"fitting {model} on 100 textile images (defaults) ...", flush=True)
        cli("fit", train, "-o", model, "--threshold-fpr", "0.05")
    images = textile_images(args.images)
    payloads = [(p.name, p.read_bytes()) for p in images]

    print(f"patchcore predict on {len(images)} images and on 1 ...", flush=True)
    t_all = cli("predict", model, *images, "-o", work / "predict-all")
    t_one = cli("predict", model, images[0], "-o", work / "predict-one")
    predict_rate = (len(images) - 1) / max(t_all - t_one, 1e-9)

    token = secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "patchcore.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PATCHCORE_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start: {server.stderr.read() if server.stderr else ''}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(timeout=60) as warm:  # one request first: lazy initialisation is not load
            warm.post(url + "/v1/predict", files=[("files", payloads[0])])

        lock = threading.Lock()
        latencies: list[float] = []
        errors: list[str] = []
        done_at: list[float] = []
        count = [0]
        stop_at = time.monotonic() + args.duration

        def client(index: int) -> None:
            with httpx.Client(timeout=120) as session:
                i = index
                while time.monotonic() < stop_at:
                    with lock:
                        if count[0] >= args.max_requests:
                            return
                        count[0] += 1
                    name, data = payloads[i % len(payloads)]
                    i += args.clients
                    started = time.perf_counter()
                    try:
                        response = session.post(url + "/v1/predict", files=[("files", (name, data, "image/jpeg"))])
                        ok = response.status_code == 200
                        problem = "" if ok else f"{response.status_code}: {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, problem = False, repr(exc)
                    finished = time.perf_counter()
                    with lock:
                        if ok:
                            latencies.append(finished - started)
                            done_at.append(time.monotonic())
                        else:
                            errors.append(problem)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(args.duration / 2)
        feedback: dict = {}
        with httpx.Client(timeout=120) as session:
            before = session.get(url + "/v1/model").json()["model_id"]
            name, data = payloads[-1]
            scored = session.post(url + "/v1/predict", files=[("files", (name, data, "image/jpeg"))]).json()
            marked = time.monotonic()
            response = session.post(
                url + "/v1/feedback",
                json={"image_id": scored["results"][0]["image_id"]},
                headers={"Authorization": f"Bearer {token}"},
            )
            feedback["status"] = response.status_code
            while time.monotonic() < stop_at + 120:
                model_info = session.get(url + "/v1/model").json()
                if model_info["model_id"] != before and not model_info["feedback_pending"]:
                    feedback.update(seconds=time.monotonic() - marked, new_model_id=model_info["model_id"])
                    break
                time.sleep(0.2)
            feedback["errors_before_update_done"] = len(errors)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=60)

    lat = np.array(latencies) * 1000
    served_rate = len(latencies) / elapsed
    figures = {
        "images": len(images),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests_ok": len(latencies),
        "errors": len(errors),
        "serve_images_per_s": round(served_rate, 2),
        "predict_images_per_s": round(predict_rate, 2),
        "ratio_serve_to_predict": round(served_rate / predict_rate, 3),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "predict_seconds_all_and_one": [round(t_all, 2), round(t_one, 2)],
        "feedback": feedback,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))
    if errors:
        print("first errors:", *errors[:5], sep="\n  ")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
