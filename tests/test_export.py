"""ONNX export and the torch-free runtime: the same answers as the torch model, a memory bank that cannot
be altered unnoticed, one-line refusals, and `patchcore predict model.onnx` with torch absent."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import patchcore.export.graph as graph_module
import patchcore.runtime as runtime_module
from helpers import run_cli, snapshot
from patchcore import PatchCore, PatchCoreConfig, PatchCoreEnsemble
from patchcore.cli import main
from patchcore.errors import PatchCoreError
from patchcore.export import export
from patchcore.export.graph import PatchCoreGraph
from patchcore.imaging import map_to_original, preprocess
from patchcore.runtime import OnnxDetector, read_export
from synthetic import SMALL, make_mvtec, texture

pytest.importorskip("onnxruntime")

# the three models of the issue: the defaults, the peers' settings, a keep-aspect (non-square) model
SETTINGS = {
    "defaults": {},
    "peers": {"resize": 256, "crop": 224, "coreset_ratio": 0.1, "normalization": "imagenet"},
    "keep-aspect": {"resize": 96, "keep_aspect": True, "scoring": "paper", "coreset_ratio": 0.1},
}


def images(seed: int, n: int, shapes: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = texture(rng, 96, defect=i % 3 == 1)
        if shapes:
            h, w = shapes[i % len(shapes)]
            image = image[:h, :w]
        out.append(image)
    return out


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, tmp_path_factory) -> tuple[PatchCore, Path, list[np.ndarray], list]:
    """A fitted model, its export, 7 test images (of 3 shapes for keep-aspect) and the model's results."""
    aspect = request.param == "keep-aspect"
    shapes = [(96, 64), (96, 64), (96, 64), (96, 64), (64, 96), (80, 72), (96, 64)] if aspect else None
    model = PatchCore(**SETTINGS[request.param]).fit(images(0, 10, shapes))
    assert model.global_ is not None  # 2 of 10 held out: the default global branch is in the graph
    test = images(1, 7, shapes)
    ranked = np.sort(model.score_samples(test))
    model.set_threshold(float(ranked[3] + ranked[4]) / 2)  # between two scores: a verdict that rounding cannot flip
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export(model, path)
    return model, path, test, list(model.infer(test))


@pytest.mark.parametrize("batch_size", [1, 7])
def test_the_export_gives_the_models_scores_maps_and_verdicts(exported, batch_size, monkeypatch):
    model, path, test, expected = exported
    monkeypatch.setattr(runtime_module, "PIXELS_PER_RUN", 10**9)  # the graph itself takes batch_size inputs
    runtime = OnnxDetector.load(path, batch_size=batch_size)
    got = list(runtime.infer(test))
    assert len(got) == len(expected) == 7
    for want, have in zip(expected, got):
        assert have.score == pytest.approx(want.score, rel=1e-4)
        assert runtime.decide(have.score)["is_anomalous"] == model.decide(want.score)["is_anomalous"]
        assert have.geometry == want.geometry and have.map().shape == want.map().shape
        assert np.abs(have.map() - want.map()).max() <= 1e-3 * want.map().max()
        at_size, expected_at_size = (
            map_to_original(have.map(), have.geometry),
            map_to_original(want.map(), want.geometry),
        )
        assert np.abs(at_size - expected_at_size).max() <= 1e-3 * expected_at_size.max()
    assert runtime.thresholds_ == model.thresholds_ and runtime.memory_bank_size == model.memory_bank_size


def test_the_export_holds_the_bank_once_and_the_settings(exported):
    onnx = pytest.importorskip("onnx")
    model, path, _, _ = exported
    proto = onnx.load(str(path))
    document = json.loads(next(p.value for p in proto.metadata_props if p.key == "patchcore"))
    bank = model.memory_bank_.numpy()
    shapes = (list(bank.shape), list(bank.shape[::-1]))
    copies = [  # no folded copy or transpose (by value: the global branch's (D, D) precision may share a shape)
        t.name
        for t in proto.graph.initializer
        if list(t.dims) in shapes and {onnx.numpy_helper.to_array(t).tobytes()} & {bank.tobytes(), bank.T.tobytes()}
    ]
    assert copies == [document["bank"]["initializer"]]
    coarse = model.coarse_.model.memory_bank_.numpy()  # the coarse bank too, once, and hashed
    assert [t.name for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).tobytes() == coarse.tobytes()] == [
        document["coarse_bank"]["initializer"]
    ]
    assert document["coarse_bank"]["rows"] == coarse.shape[0]
    assert document["config"] == model.config.to_dict()
    assert document["input"]["mean"] == list(model.normalization_[0])
    assert document["thresholds"] == model.thresholds_.to_dict()
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][0] == "batch"


@pytest.mark.parametrize(
    "settings",
    [dict(SMALL, scoring="official", k=3, target_dim=64), dict(SMALL, scoring="paper"), dict(SMALL, image_top_k=5)],
)
def test_the_graph_computes_every_scoring_mode_like_the_model(rng_images, settings, monkeypatch):
    monkeypatch.setattr(graph_module, "DISTANCES_PER_IMAGE", 10 * 20)  # chunks of 20 bank rows
    model = PatchCore(**settings).fit(rng_images)
    channels = [info.channels for info in model.backbone_.feature_info]
    graph = PatchCoreGraph(model.backbone_, model.memory_bank_, model.config, channels, patches=10).eval()
    assert graph.chunk_rows < model.memory_bank_size  # several chunks of the bank
    test = images(2, 4)
    mean, std = model.normalization_
    x = torch.stack([preprocess(t / 255.0, 64, 56, mean, std)[0] for t in test])
    with torch.inference_mode():
        scores, maps = graph(x.float())
    for i, result in enumerate(model.infer(test)):
        assert float(scores[i]) == pytest.approx(result.score, rel=1e-5)
        np.testing.assert_allclose(maps[i].numpy(), result.map(), atol=1e-4 * result.map().max())


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A small model fitted and exported by the CLI, with a folder of test images: (model, export, folder)."""
    root = tmp_path_factory.mktemp("cli")
    category = make_mvtec(root / "category", n_train=6)
    model = root / "model.safetensors"
    small = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.25", "--threshold-fpr", "0.2"]
    assert main(["fit", str(category), "-o", str(model), *small]) == 0
    assert main(["export", str(model), "-o", str(root / "model.onnx")]) == 0
    return model, root / "model.onnx", category / "test"


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def same_outputs(torch_out: Path, onnx_out: Path) -> None:
    """The files two predict runs wrote: the same names, rows, verdicts; scores and maps within tolerance."""
    names = sorted(str(p.relative_to(torch_out)) for p in torch_out.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(onnx_out)) for p in onnx_out.rglob("*") if p.is_file())
    for want, have in zip(rows(torch_out), rows(onnx_out)):
        assert have["path"] == want["path"] and have["is_anomalous"] == want["is_anomalous"]
        assert float(have["score"]) == pytest.approx(float(want["score"]), rel=1e-4)
    for npy in torch_out.rglob("*.npy"):
        want, have = np.load(npy), np.load(onnx_out / npy.relative_to(torch_out))
        assert np.abs(have - want).max() <= 1e-3 * want.max()


def test_predict_with_an_export_writes_the_same_files(cli_model, tmp_path):
    model, onnx_file, folder = cli_model
    for name, source in (("torch", model), ("onnx", onnx_file)):
        assert main(["predict", str(source), str(folder), "-o", str(tmp_path / name), "--maps", "--overlays"]) == 0
    same_outputs(tmp_path / "torch", tmp_path / "onnx")
    assert len(rows(tmp_path / "onnx")) == 6 and (tmp_path / "onnx" / "results.jsonl").is_file()


BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
from patchcore.cli import main
from patchcore.errors import PatchCoreError
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_predict_with_an_export_needs_no_torch(cli_model, tmp_path):
    model, onnx_file, folder = cli_model
    args = ["predict", str(onnx_file), str(folder), "-o", str(tmp_path / "onnx"), "--maps", "--overlays"]
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert main(["predict", str(model), str(folder), "-o", str(tmp_path / "torch"), "--maps", "--overlays"]) == 0
    same_outputs(tmp_path / "torch", tmp_path / "onnx")


def test_evaluate_takes_an_export(cli_model, tmp_path):
    model, onnx_file, folder = cli_model
    category = folder.parent
    for name, source in (("torch", model), ("onnx", onnx_file)):
        assert main(["evaluate", str(category), "--model", str(source), "-o", str(tmp_path / name)]) == 0
    want, have = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("torch", "onnx"))
    assert round(have["image_auroc"], 4) == round(want["image_auroc"], 4)
    assert round(have["pixel_auroc"], 4) == round(want["pixel_auroc"], 4)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("patchcore: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_altered_or_foreign_exports_are_refused(cli_model, tmp_path):
    _, onnx_file, folder = cli_model
    data = onnx_file.read_bytes()
    bank = OnnxDetector.load(onnx_file).metadata_["bank"]
    tampered = tmp_path / "tampered.onnx"
    raw = np.ascontiguousarray(PatchCore.load(onnx_file.with_suffix(".safetensors")).memory_bank_.numpy()).tobytes()
    at = data.index(raw[:64])
    tampered.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"\x08\x07\x12\x04test")  # a valid protobuf: ir_version 7, no metadata
    cases = [(tampered, "SHA-256"), (truncated, "not an ONNX model"), (foreign, "patchcore export")]
    for path, words in cases:
        done = run_cli("predict", path, folder, "-o", tmp_path / "out")
        one_line_error(done, str(path), words)
        assert not (tmp_path / "out").exists()
    done = run_cli("predict", onnx_file, folder, "-o", tmp_path / "out", "--device", "cuda")
    one_line_error(done, "--device")
    assert bank["rows"] * bank["dim"] * 4 == len(raw)


def test_an_altered_coarse_bank_is_refused(exported, tmp_path):
    model, path, _, _ = exported
    data = path.read_bytes()
    raw = np.ascontiguousarray(model.coarse_.model.memory_bank_.numpy()).tobytes()
    at = data.index(raw[:64])
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    with pytest.raises(PatchCoreError, match="coarse bank's SHA-256"):
        OnnxDetector.load(tampered)


def test_what_cannot_be_exported_is_refused_in_one_line(cli_model, rng_images, tmp_path):
    model, onnx_file, _ = cli_model
    ensemble = PatchCoreEnsemble([PatchCoreConfig(**SMALL), PatchCoreConfig(**SMALL, backbone="efficientnet_lite1")])
    ensemble.fit(rng_images)
    ensemble.save(tmp_path / "ensemble.safetensors")
    PatchCore(**SMALL, tile_size=32).fit(rng_images[:2]).save(tmp_path / "tiles.safetensors")
    (tmp_path / "notes.onnx").write_text("my notes")
    (tmp_path / "image.png").write_bytes(b"not a model")
    (tmp_path / "fresh.bin").write_bytes(b"someone's data, beside where an OpenVINO export would go")
    before = snapshot(tmp_path)
    cases = [
        (["export", tmp_path / "image.png", "-o", tmp_path / "x.onnx"], ["image.png"]),
        (["export", tmp_path / "ensemble.safetensors", "-o", tmp_path / "x.onnx"], ["ensemble", "single-backbone"]),
        (["export", tmp_path / "tiles.safetensors", "-o", tmp_path / "x.onnx"], ["tiling"]),
        (["export", model, "-o", tmp_path / "x.txt"], [".onnx"]),
        (["export", model, "-o", tmp_path / "notes.onnx"], ["notes.onnx", "not overwritten"]),
        (["export", model, "-o", tmp_path / "fresh.onnx", "--format", "openvino"], ["fresh.bin", "replace"]),
    ]
    for args, words in cases:
        one_line_error(run_cli(*args), *words)
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced
    assert OnnxDetector.load(onnx_file).memory_bank_size > 0


def test_a_large_bank_goes_to_external_data(fitted, tmp_path, monkeypatch):
    import patchcore.export as exporting

    monkeypatch.setattr(exporting, "EXTERNAL_DATA_BYTES", 0)
    written = export(fitted, tmp_path / "model.onnx")
    assert sorted(p.name for p in written) == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temporaries
    test = images(3, 3)
    runtime = OnnxDetector.load(tmp_path / "model.onnx")
    for want, have in zip(fitted.score_samples(test), runtime.score_samples(test)):
        assert have == pytest.approx(want, rel=1e-4)
    data = bytearray((tmp_path / "model.onnx.data").read_bytes())
    at = bytes(data).index(fitted.memory_bank_.numpy().tobytes()[:64])
    data[at] ^= 1
    (tmp_path / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(Exception, match="SHA-256"):
        OnnxDetector.load(tmp_path / "model.onnx")


def test_the_two_banks_together_decide_on_external_data(tmp_path, monkeypatch):
    import patchcore.export as exporting

    model = PatchCore(resize=64, crop=56, coreset_ratio=0.25, seed=0).fit(images(0, 10))
    fine, coarse = model.memory_bank_.numpy(), model.coarse_.model.memory_bank_.numpy()
    monkeypatch.setattr(exporting, "EXTERNAL_DATA_BYTES", fine.nbytes)  # each bank alone fits, both do not
    export(model, tmp_path / "model.onnx")
    data = (tmp_path / "model.onnx.data").read_bytes()
    assert fine.tobytes() in data and coarse.tobytes() in data  # both beside the graph
    test = images(3, 3)
    np.testing.assert_allclose(
        OnnxDetector.load(tmp_path / "model.onnx").score_samples(test), model.score_samples(test), rtol=1e-4
    )


def test_openvino_export(fitted, tmp_path):
    ov = pytest.importorskip("openvino")
    written = export(fitted, tmp_path / "model.xml", "openvino")
    assert sorted(p.name for p in written) == ["model.bin", "model.xml"]
    # f32 as exported: on CPUs with bf16 units OpenVINO would otherwise run in bf16 (0.7% off here)
    compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    test = images(4, 3)
    mean, std = fitted.normalization_
    x = np.stack([preprocess(t / 255.0, 64, 56, mean, std)[0].numpy() for t in test]).astype(np.float32)
    result = compiled(x)
    scores = result[compiled.outputs[0]]
    for want, have in zip(fitted.score_samples(test), scores):
        assert have == pytest.approx(want, rel=1e-4)
    assert "patchcore-onnx" in (tmp_path / "model.xml").read_text()


def test_the_export_keeps_the_textile_aurocs_to_four_decimals(tmp_path):
    """The textile protocol (the README's main job) with every default, scored by the model and its export."""
    from patchcore.datasets import textile
    from patchcore.evaluation.evaluate import evaluate

    data = textile()
    model = PatchCore().fit(data.train)
    export(model, tmp_path / "model.onnx")
    want, _ = evaluate(model, data)
    have, _ = evaluate(OnnxDetector.load(tmp_path / "model.onnx"), data)
    assert round(have["image_auroc"], 4) == round(want["image_auroc"], 4)  # good vs all (textile has no masks)
    for kind, value in want["image_auroc_by_type"].items():  # good vs local, good vs global
        assert round(have["image_auroc_by_type"][kind], 4) == round(value, 4), kind


def varint(value: int) -> bytes:
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        out += bytes([low | (0x80 if value else 0)])
        if not value:
            return out


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_second_copy_of_the_bank_is_refused_not_skipped(tmp_path):
    """Protobuf lets the last copy of a field win: a reader that hashed the first copy could be shown other
    bytes than ONNX Runtime loads. Repeated fields of the bank are refused."""
    honest, other = np.zeros(4, np.float32).tobytes(), np.ones(4, np.float32).tobytes()
    document = {
        "format": "patchcore-onnx",
        "format_version": 1,
        "config": {},
        "input": {"resize": 64, "crop": 56, "keep_aspect": False, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "bank": {"initializer": "bank", "rows": 1, "dim": 4, "sha256": hashlib.sha256(honest).hexdigest()},
    }
    metadata = field(14, field(1, b"patchcore") + field(2, json.dumps(document, separators=(",", ":")).encode()))
    for tensor in (field(8, b"bank") + field(9, honest) + field(9, other), field(8, b"bank") + field(9, honest)):
        path = tmp_path / "model.onnx"
        path.write_bytes(field(7, field(5, tensor)) + metadata)
        if tensor.endswith(other):
            with pytest.raises(PatchCoreError, match="repeats a field"):
                read_export(path)
        else:
            assert read_export(path)["bank"]["rows"] == 1  # the honest file passes the same check
