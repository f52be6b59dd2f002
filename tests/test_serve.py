"""The inspection service: its API through an in-process client, and a real ``patchcore serve`` subprocess on a
free loopback port (the same numbers as ``patchcore predict``, a bad model refused at start, a kill during a
feedback save leaving a loadable model)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchcore
from helpers import run_cli
from synthetic import SMALL, _save, texture

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from patchcore.serve.app import create_app  # noqa: E402
from patchcore.serve.service import Service  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory) -> Path:
    """data/good/*.png (the training images), data/test/{good,bad}.png and model.safetensors fitted with
    thresholds by ``patchcore fit``'s own function."""
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(5)
    for i in range(6):
        _save(texture(rng), root / "data" / "good" / f"{i}.png")
    _save(texture(rng), root / "test" / "good.png")
    _save(texture(rng, defect=True), root / "test" / "bad.png")
    paths = sorted((root / "data" / "good").glob("*.png"))
    model = patchcore.PatchCore(**SMALL, threshold_fpr=0.2, calibration_share=0.35).fit(paths, root=root / "data")
    model.save(root / "model.safetensors")
    return root


@pytest.fixture
def model_copy(fitted_dir, tmp_path) -> Path:
    """A private copy of the model: feedback and reload change it."""
    target = tmp_path / "model.safetensors"
    shutil.copy(fitted_dir / "model.safetensors", target)
    return target


@pytest.fixture
def client(fitted_dir, model_copy):
    service = Service(model_copy, data_roots=[fitted_dir / "data"])
    with TestClient(create_app(service, token=TOKEN, max_upload_mb=0.05)) as test_client:
        test_client.service = service  # type: ignore[attr-defined]
        yield test_client
    service.close()


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def wait_for_update(client, before: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = client.get("/v1/model").json()
        if model["model_id"] != before and not model["feedback_pending"]:
            return model
        assert model["last_update_error"] is None, model["last_update_error"]
        time.sleep(0.1)
    raise AssertionError("the feedback update did not finish")


def test_predict_gives_the_library_numbers_the_model_id_and_overlays_at_original_size(client, fitted_dir, model_copy):
    images = [fitted_dir / "test" / "good.png", fitted_dir / "test" / "bad.png"]
    response = client.post("/v1/predict", params={"overlay": "true"}, files=upload(*images))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == hashlib.sha256(model_copy.read_bytes()).hexdigest()
    detector = patchcore.load(model_copy)
    expected = detector.predict(images)
    for row, path, want in zip(body["results"], images, expected):
        assert row["filename"] == path.name
        assert row["score"] == pytest.approx(want.score, rel=1e-6)
        assert row["threshold"] == want.threshold and row["is_anomalous"] == want.is_anomalous
        assert row["normalized_score"] == pytest.approx(want.normalized_score, rel=1e-6)
        overlay = Image.open(io.BytesIO(base64.b64decode(row["overlay_png"])))
        assert overlay.size == Image.open(path).size and overlay.mode == "RGB"
        outline = Image.open(io.BytesIO(base64.b64decode(row["outline_png"])))
        assert outline.size == overlay.size and outline.mode == "RGBA"
    assert [r["is_anomalous"] for r in body["results"]] == [False, True]
    plain = client.post("/v1/predict", files=upload(images[1])).json()["results"][0]
    assert "overlay_png" not in plain and plain["score"] == body["results"][1]["score"]


def test_model_health_and_metrics(client, model_copy):
    model = client.get("/v1/model").json()
    assert model["model_id"] == hashlib.sha256(model_copy.read_bytes()).hexdigest()
    assert model["backbone"] == ["efficientnet_lite0"] and model["memory_bank_size"] > 0
    assert model["thresholds"]["image"] > 0 and model["feedback_updates"] == 0 and model["config"]["resize"] == 64
    assert model["provenance"]["package_version"] and model["explanations"] is True
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/predict", files=upload(*sorted(model_copy.parent.glob("*.nothing"))))  # 400: no files
    client.post("/v1/predict", files=[("files", ("a.png", Path(__file__).read_bytes(), "image/png"))])
    text = client.get("/metrics").text
    assert 'patchcore_requests_total{endpoint="/v1/predict",status="400"} 1' in text
    assert 'patchcore_requests_total{endpoint="/v1/predict",status="415"} 1' in text
    assert 'patchcore_request_duration_seconds_bucket{endpoint="/v1/model",le="+Inf"} 1' in text
    assert f'patchcore_model_info{{model_id="{model["model_id"]}"}} 1' in text
    for name in ("patchcore_images_scored_total", "patchcore_images_flagged_total", "patchcore_image_score_count"):
        assert f"\n{name} " in text


def test_non_images_get_415_and_large_uploads_413_naming_the_file(client, fitted_dir):
    response = client.post("/v1/predict", files=[("files", ("notes.txt", b"not an image", "text/plain"))])
    assert response.status_code == 415 and response.json()["filename"] == "notes.txt"
    assert "notes.txt" in response.json()["error"]
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big, "PNG")
    response = client.post("/v1/predict", files=[("files", ("big.png", big.getvalue(), "image/png"))])
    assert response.status_code == 413 and "big.png" in response.json()["error"]


def test_mutations_need_the_token_and_requests_never_name_paths(client, fitted_dir, model_copy):
    first = client.post(
        "/v1/predict",
        files=[("files", ("../../../etc/passwd", (fitted_dir / "test" / "bad.png").read_bytes(), "image/png"))],
    )
    image_id = first.json()["results"][0]["image_id"]
    assert client.post("/v1/feedback", json={"image_id": image_id}).status_code == 401
    assert client.post("/v1/reload").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/v1/feedback", json={"image_id": image_id}, headers=wrong).status_code == 401
    assert client.post("/v1/feedback", json={"image_id": "/etc/passwd"}, headers=auth()).status_code == 404
    assert client.get("/v1/explain", params={"image_id": "../model.safetensors"}).status_code == 404
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404
    image = (fitted_dir / "test" / "good.png").read_bytes()
    as_file = client.post("/v1/feedback", files=[("file", ("g.png", image, "image/png"))], headers=auth())
    assert as_file.status_code == 202 and as_file.json()["stored"].startswith("model.safetensors.feedback/")


def test_readyz_is_503_without_a_working_model(client):
    client.service.scorer.stop()
    assert client.get("/readyz").status_code == 503


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_feedback_extends_the_model_in_the_background_and_swaps_it_in(client, fitted_dir, model_copy):
    bad = fitted_dir / "test" / "bad.png"
    before = client.get("/v1/model").json()
    first = client.post("/v1/predict", files=upload(bad)).json()["results"][0]
    image_id = first["image_id"]
    response = client.post("/v1/feedback", json={"image_id": image_id}, headers=auth())
    assert response.status_code == 202, response.text
    stored = model_copy.parent / response.json()["stored"]
    assert stored.parent == model_copy.parent / "model.safetensors.feedback" and stored.read_bytes() == bad.read_bytes()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the swap, the old model answers; every request succeeds meanwhile
        scored = client.post("/v1/predict", files=upload(bad))
        assert scored.status_code == 200
        if scored.json()["model_id"] != before["model_id"]:
            break
    after = wait_for_update(client, before["model_id"])
    assert after["model_id"] == hashlib.sha256(model_copy.read_bytes()).hexdigest()
    assert (
        after["feedback_updates"] == 1 and after["feedback_images"] == 1 and after["n_train"] == before["n_train"] + 1
    )
    assert after["memory_bank_size"] >= before["memory_bank_size"]
    backup = model_copy.with_name("model.safetensors.bak")
    assert hashlib.sha256(backup.read_bytes()).hexdigest() == before["model_id"]
    reloaded = patchcore.load(model_copy)
    assert reloaded.train_paths_[-1] == f"model.safetensors.feedback/{stored.name}"
    assert scored.json()["results"][0]["score"] <= first["score"] + 1e-6  # what was marked good is no more anomalous
    explanation = client.get("/v1/explain", params={"image_id": image_id}).json()
    assert explanation["status"] == "ok" and explanation["model_id"] == after["model_id"]


def test_explain_returns_both_patches(client, fitted_dir):
    image_id = client.post("/v1/predict", files=upload(fitted_dir / "test" / "bad.png")).json()["results"][0][
        "image_id"
    ]
    body = client.get("/v1/explain", params={"image_id": image_id}).json()
    assert body["status"] == "ok" and body["nearest"]["path"].startswith("good/")
    for key in ("patch_crop_png", "nearest_crop_png"):
        assert Image.open(io.BytesIO(base64.b64decode(body[key]))).mode == "RGB"
    assert len(body["patch"]["box"]) == 4 and body["patch"]["score"] > 0


def test_reload_refuses_a_bad_file_and_keeps_serving(client, fitted_dir, model_copy):
    old = client.get("/v1/model").json()["model_id"]
    good_bytes = model_copy.read_bytes()
    model_copy.write_bytes(good_bytes[:-10])  # truncated
    response = client.post("/v1/reload", headers=auth())
    assert response.status_code == 409 and old in response.json()["error"]
    assert client.post("/v1/predict", files=upload(fitted_dir / "test" / "good.png")).json()["model_id"] == old
    refit = patchcore.PatchCore(**{**SMALL, "coreset_ratio": 0.5}).fit(sorted((fitted_dir / "data" / "good").glob("*")))
    model_copy.unlink()
    refit.save(model_copy)
    response = client.post("/v1/reload", headers=auth()).json()
    assert response["changed"] and response["model_id"] == hashlib.sha256(model_copy.read_bytes()).hexdigest()
    assert client.get("/v1/model").json()["thresholds"]["image"] is None


# ---------------------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore.cli", "serve", str(model), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {process.communicate()[1]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("serve did not become ready")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_real_server_scores_like_patchcore_predict_and_survives_a_kill_during_a_save(
    fitted_dir, model_copy, tmp_path
):
    images = [fitted_dir / "test" / "good.png", fitted_dir / "test" / "bad.png"]
    predicted = run_cli("predict", model_copy, *images, "-o", tmp_path / "out")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    process, url = start_server(model_copy, "--data", str(fitted_dir / "data"), env={"PATCHCORE_TOKEN": TOKEN})
    try:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        body = httpx.post(url + "/v1/predict", files=files, timeout=60).json()
        for row, want in zip(body["results"], rows):
            assert row["score"] == pytest.approx(want["score"], rel=1e-6)
            assert row["is_anomalous"] == want["is_anomalous"] and row["threshold"] == want["threshold"]
        assert httpx.post(url + "/v1/reload", timeout=60).status_code == 401  # the token came from the environment
        caught = False
        for attempt in range(8):  # mark images good until the kill lands while the model file is being written
            image = texture(np.random.default_rng(100 + attempt), defect=True)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            files = [("files", (f"{attempt}.png", buffer.getvalue(), "image/png"))]
            image_id = httpx.post(url + "/v1/predict", files=files, timeout=60).json()["results"][0]["image_id"]
            before = httpx.get(url + "/v1/model", timeout=60).json()["model_id"]
            response = httpx.post(url + "/v1/feedback", json={"image_id": image_id}, headers=auth(), timeout=60)
            assert response.status_code == 202
            saving = f".{model_copy.name}.{process.pid}."
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not caught:
                caught = any(name.startswith(saving) for name in os.listdir(model_copy.parent))
                if not caught and hashlib.sha256(model_copy.read_bytes()).hexdigest() != before:
                    break  # the save finished before we saw it: try again with another image
            if caught:
                process.kill()  # SIGKILL mid-save: no cleanup of any kind
                process.wait()
                break
        assert caught, "the kill never landed during a save"
    finally:
        stop(process)
    detector = patchcore.load(model_copy)  # the old model or the new one, whole either way
    assert detector.memory_bank_size > 0


def test_serve_refuses_a_bad_model_in_one_line(tmp_path, model_copy):
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(model_copy.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for model in (damaged, tmp_path / "missing.safetensors"):
        result = run_cli("serve", model, "--port", str(free_port()), timeout=120)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("patchcore: error: ")
        assert str(model) in result.stderr


def test_a_public_address_without_a_token_is_warned_about(model_copy):
    # 192.0.2.1 (TEST-NET-1) is nobody's address: the warning comes before the bind, which then fails
    result = run_cli("serve", model_copy, "--host", "192.0.2.1", "--port", str(free_port()), timeout=120)
    assert "without a token" in result.stderr


def test_the_scorer_batches_waiting_requests_and_one_bad_request_fails_alone():
    from patchcore.serve.service import Scorer, Served

    calls: list[int] = []

    class Fake:
        def infer(self, images, maps=True):
            calls.append(len(images))
            if any(image.shape[0] == 1 for image in images):
                raise patchcore.PatchCoreError("too small")
            return [image.shape[0] for image in images]

    gate = threading.Event()
    scorer = Scorer(lambda: Served(Fake(), "id", 0), max_batch=8)  # type: ignore[arg-type]
    try:
        blocker = scorer.call(lambda served: gate.wait(10))  # holds the thread while requests queue up
        futures = [scorer.score([np.zeros((n, 2))], maps=False) for n in (3, 1, 4)]
        gate.set()
        blocker.result(10)
        assert futures[0].result(10)[1] == [3] and futures[2].result(10)[1] == [4]
        with pytest.raises(patchcore.PatchCoreError, match="too small"):
            futures[1].result(10)
        assert calls[0] == 3  # the three waiting requests went into one batch first
    finally:
        scorer.stop()
