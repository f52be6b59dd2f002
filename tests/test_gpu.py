"""``device="cuda"``: fit and predict on the GPU end to end, and the CPU's answers. Skipped without a CUDA GPU
(``benchmarks/gpu_check.sh`` runs this file on a GPU machine); the last test checks that script's refusal here.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import patchcore.detectors.patchcore as detector_module
from helpers import run_cli
from patchcore import PatchCore
from patchcore.core.coreset import greedy_coreset_reference
from patchcore.core.coreset_torch import greedy_coreset_torch
from synthetic import SMALL, _save, texture

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "square": {},
    "keep-aspect": {"keep_aspect": True, "crop": None},
    "tiles": {"tile_size": 40, "keep_aspect": True, "crop": None},
}


def sized(rng: np.random.Generator, height: int, width: int, defect: bool = False) -> np.ndarray:
    """synthetic.texture at (H, W): a square texture stretched to the size (shapes vary, content alike)."""
    from PIL import Image

    return np.asarray(Image.fromarray(texture(rng, 48, defect)).resize((width, height)))


@pytest.fixture(scope="module")
def data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(11)
    shapes = [(48, 48), (40, 72), (56, 44), (48, 48), (36, 60), (48, 48)]
    train = [sized(rng, h, w) for h, w in shapes]
    test = [sized(rng, h, w, defect=i % 2 == 1) for i, (h, w) in enumerate(shapes)]
    return train, test


@needs_cuda
@pytest.mark.parametrize("name", list(SETTINGS))
def test_fit_and_predict_stay_on_the_gpu(monkeypatch, data, name):
    train, test = data

    def cpu_coreset(*args, **kwargs):
        raise AssertionError("the CPU (numpy) greedy coreset ran in a CUDA fit")

    searched: list[tuple[str, str]] = []
    real_scores = detector_module.patch_scores

    def spy(patches, index, *args, **kwargs):
        searched.append((patches.device.type, index.bank.device.type))
        scores, nearest = real_scores(patches, index, *args, **kwargs)
        searched.append((scores.device.type, nearest.device.type))
        return scores, nearest

    monkeypatch.setattr(detector_module, "greedy_coreset", cpu_coreset)
    monkeypatch.setattr(detector_module, "patch_scores", spy)
    model = PatchCore(**{**SMALL, **SETTINGS[name]}, device="cuda").fit(train)
    assert model.memory_bank_.device.type == "cuda" and model._index.bank.device.type == "cuda"
    assert {p.device.type for p in model.backbone_.parameters()} == {"cuda"}
    predictions = model.predict(test)
    assert searched and set(searched) == {("cuda", "cuda")}  # features, bank and answers on the GPU
    assert [p.anomaly_map.shape for p in predictions] == [image.shape[:2] for image in test]
    distances, indices = model._index.search(model.memory_bank_[:4], 2)
    assert distances.is_cuda and indices.is_cuda
    np.testing.assert_array_equal(indices[:, 0].cpu().numpy(), np.arange(4))


@needs_cuda
@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_gpu_scores_a_model_like_the_cpu(data, name):
    train, test = data
    cpu = PatchCore(**{**SMALL, **SETTINGS[name]}).fit(train)
    gpu = PatchCore.from_state(cpu.get_state(), device="cuda")
    assert gpu.memory_bank_.is_cuda
    for on_cpu, on_gpu in zip(cpu.predict(test), gpu.predict(test)):
        assert on_gpu.score == pytest.approx(on_cpu.score, rel=1e-4)
        scale = float(np.abs(on_cpu.anomaly_map).max())
        np.testing.assert_allclose(on_gpu.anomaly_map, on_cpu.anomaly_map, rtol=1e-4, atol=1e-4 * scale)


@needs_cuda
def test_a_gpu_fit_keeps_what_a_cpu_fit_keeps(data):
    train, test = data
    cpu = PatchCore(**SMALL).fit(train)
    gpu = PatchCore(**SMALL, device="cuda").fit(train)
    assert gpu.memory_bank_size == cpu.memory_bank_size and gpu.feature_shape_ == cpu.feature_shape_
    # the same greedy selection, up to near-ties that the GPU's rounding may break the other way
    assert gpu.bank_source_ is not None and cpu.bank_source_ is not None
    same = {tuple(r) for r in gpu.bank_source_.tolist()} & {tuple(r) for r in cpu.bank_source_.tolist()}
    assert len(same) >= 0.9 * cpu.memory_bank_size
    np.testing.assert_allclose(gpu.score_samples(test), cpu.score_samples(test), rtol=2e-2)


@needs_cuda
def test_the_greedy_coreset_on_the_gpu_selects_the_reference_s_rows():
    x = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
    expected = greedy_coreset_reference(x, 300, projection_dim=32, seed=1)
    chosen = greedy_coreset_torch(torch.from_numpy(x).cuda(), 300, projection_dim=32, seed=1)
    # early steps are far from any tie; later a near-tie may go the other way: the covering radius must not
    np.testing.assert_array_equal(chosen[:50], expected[:50])
    features = torch.from_numpy(x)

    def radius(rows: np.ndarray) -> float:  # the covering radius: what the greedy selection keeps small
        return float(torch.cdist(features, features[torch.from_numpy(rows)]).min(dim=1).values.max())

    assert radius(chosen) <= 1.01 * radius(expected)


@needs_cuda
def test_a_cpu_search_on_a_gpu_model_is_said(caplog):
    pytest.importorskip("faiss")
    with caplog.at_level(logging.WARNING):
        PatchCore(**SMALL, device="cuda", search="faiss-flat").fit([texture(np.random.default_rng(0))])
    assert "runs on the CPU" in caplog.text


@needs_cuda
def test_the_command_line_fits_and_predicts_on_the_gpu(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(4):
        _save(texture(rng), tmp_path / "good" / f"{i}.png")
    _save(texture(rng, defect=True), tmp_path / "test" / "bad.png")
    fast = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.25"]
    model = tmp_path / "model.safetensors"
    done = run_cli("fit", tmp_path / "good", "-o", model, *fast, "--device", "cuda")
    assert done.returncode == 0, done.stderr
    done = run_cli("predict", model, tmp_path / "test", "-o", tmp_path / "out", "--device", "cuda", "--maps")
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "out" / "maps" / "bad.npy").shape == (48, 48)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a CUDA GPU")
def test_gpu_check_refuses_in_one_line_without_a_gpu():
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA GPU" in done.stderr and done.stderr.count("\n") == 1 and not done.stdout
