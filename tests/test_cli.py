"""The command line, run in a subprocess like a user would: exit codes, files, one-line errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli as run
from synthetic import make_mvtec

FAST = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.5"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("data") / "cat")


@pytest.fixture(scope="module")
def model_file(category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "model.safetensors"
    result = run("fit", category, "-o", path, *FAST, "--seed", "3")
    assert result.returncode == 0, result.stderr
    return path


def test_fit_writes_a_model_with_the_given_settings(model_file):
    result = run("info", model_file)
    assert result.returncode == 0
    header = json.loads(result.stdout)
    assert header["config"]["seed"] == 3 and header["config"]["crop"] == 56
    assert header["train"]["n_train"] == 5


def test_predict_scores_and_maps(model_file, category, tmp_path):
    out = tmp_path / "out"
    result = run("predict", model_file, category / "test", category / "train" / "good" / "000.png", "-o", out, "--maps")
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr and "img/s" not in result.stderr  # progress bars stay quiet off a terminal
    rows = read_csv(out / "scores.csv")
    assert list(rows[0])[:2] == ["path", "score"]
    assert len(rows) == 7 and all(float(r["score"]) >= 0 for r in rows)
    blob = out / "maps" / "blob" / "000.npy"
    amap = np.load(blob)
    assert amap.dtype == np.float32 and amap.shape == (48, 48)
    assert (out / "maps" / "good" / "000.npy").is_file() and (out / "maps" / "000.npy").is_file()
    scores = {Path(r["path"]).parent.name: float(r["score"]) for r in rows}
    assert scores["blob"] > scores["good"]


def test_predict_reports_unreadable_images_and_scores_the_rest(model_file, category, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(category / "test" / "good" / "000.png").save(inputs / "ok.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = run("predict", model_file, inputs, "-o", out)
    assert result.returncode != 0
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(out / "scores.csv")}
    assert rows["ok.png"]["score"] and not rows["ok.png"]["error"]
    assert not rows["broken.png"]["score"] and "broken.png" in rows["broken.png"]["error"]


def test_evaluate_writes_metrics_and_scores(category, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", category, "-o", out, *FAST)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "image_auroc_by_type",
        "pixel_auroc",
        "pro",
        "n_train",
        "n_test",
        "memory_bank_size",
        "feature_seconds",
        "coreset_seconds",
        "fit_seconds",
        "predict_seconds_per_image",
    ):
        assert key in metrics, key
    assert metrics["image_auroc"] == 1.0 and set(metrics["image_auroc_by_type"]) == {"blob"}
    assert metrics["pixel_auroc"] > 0.8 and 0 <= metrics["pro"] <= 1
    assert metrics["n_train"] == 5 and metrics["n_test"] == 6
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 6 and {"path", "score", "label", "defect_type"} <= set(rows[0])


def test_evaluate_with_a_fitted_model(model_file, category, tmp_path):
    result = run("evaluate", category, "-o", tmp_path / "e", "--model", model_file)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["fit_seconds"] is None


def test_failed_fit_leaves_no_model(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image at all")
    target = tmp_path / "model.safetensors"
    result = run("fit", data, "-o", target, *FAST)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a.png" in lines[0] and lines[0].startswith("patchcore: error:")
    assert not target.exists() and list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*")) == []


def test_failed_fit_keeps_an_existing_model(model_file, tmp_path):
    before = model_file.read_bytes()
    result = run("fit", tmp_path / "nothing-here", "-o", model_file, *FAST)
    assert result.returncode != 0 and "no such folder" in result.stderr
    assert model_file.read_bytes() == before


def test_edited_model_gets_one_clear_line(model_file, tmp_path):
    edited = tmp_path / "edited.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the memory bank
    edited.write_bytes(bytes(data))
    result = run("predict", edited, model_file, "-o", tmp_path / "o")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "checksum" in result.stderr and "Traceback" not in result.stderr
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_file.read_bytes()[:100])
    result = run("info", truncated)
    assert result.returncode != 0 and "truncated.safetensors" in result.stderr


def test_bad_flag_values_are_one_line_errors(category, tmp_path):
    result = run("fit", category, "-o", tmp_path / "m", "--coreset-ratio", "2")
    assert result.returncode != 0 and "coreset_ratio" in result.stderr and "Traceback" not in result.stderr
    result = run("evaluate", category / "train" / "good", "-o", tmp_path / "e", *FAST)
    assert result.returncode != 0 and "no test split" in result.stderr


def test_predict_with_the_faiss_backend_matches_exact(model_file, category, tmp_path):
    pytest.importorskip("faiss")
    exact, flat = tmp_path / "exact", tmp_path / "flat"
    assert run("predict", model_file, category / "test", "-o", exact).returncode == 0
    result = run("predict", model_file, category / "test", "-o", flat, "--search", "faiss-flat")
    assert result.returncode == 0, result.stderr
    a = [float(r["score"]) for r in read_csv(exact / "scores.csv")]
    b = [float(r["score"]) for r in read_csv(flat / "scores.csv")]
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_threshold_columns_in_scores_csv(category, tmp_path):
    model = tmp_path / "thr.safetensors"
    result = run("fit", category, "-o", model, *FAST, "--threshold-fpr", "0.2", "--calibration-share", "0.4")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "p"
    assert run("predict", model, category / "test", "-o", out).returncode == 0
    rows = read_csv(out / "scores.csv")
    assert list(rows[0])[:5] == ["path", "score", "threshold", "is_anomalous", "normalized_score"]
    for row in rows:
        above = float(row["score"]) >= float(row["threshold"])
        assert row["is_anomalous"] == ("true" if above else "false")
        assert (float(row["normalized_score"]) >= 0.5) == above
    assert all(r["is_anomalous"] == "true" for r in rows if "blob" in r["path"])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_maps_onto_the_flags_and_flags_win(category, tmp_path, suffix):
    config = tmp_path / f"settings{suffix}"
    if suffix == ".json":
        config.write_text(
            json.dumps({"resize": 64, "crop": 56, "coreset-ratio": 0.5, "seed": 7, "layers": ["blocks.2", "blocks.4"]})
        )
    else:
        config.write_text("resize: 64\ncrop: 56\ncoreset_ratio: 0.5\nseed: 7\nlayers: blocks.2 blocks.4\n")
    model = tmp_path / "m.safetensors"
    result = run("fit", category, "-o", model, "--config", config, "--seed", "9")
    assert result.returncode == 0, result.stderr
    saved = json.loads(run("info", model).stdout)["config"]
    assert saved["seed"] == 9 and saved["coreset_ratio"] == 0.5 and saved["layers"] == ["blocks.2", "blocks.4"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("coreset_ration: 0.1\n")
    result = run("fit", category, "-o", tmp_path / "x", "--config", bad)
    assert result.returncode != 0 and "coreset_ration" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_plain_folders(category, tmp_path):
    out = tmp_path / "e"
    result = run(
        "evaluate",
        "--good",
        category / "train" / "good",
        "--defective",
        category / "test" / "blob",
        "--masks",
        category / "ground_truth" / "blob",
        "-o",
        out,
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 4 and metrics["n_test"] == 4 and set(metrics["image_auroc_by_type"]) == {"blob"}
    assert "pro" in metrics
    result = run("fit", category, "--good", category, "-o", tmp_path / "m")
    assert result.returncode != 0 and "not both" in result.stderr


def test_fit_add_extends_a_model(model_file, category, tmp_path):
    extended = tmp_path / "more.safetensors"
    result = run("fit", category / "test" / "good", "--add", model_file, "-o", extended)
    assert result.returncode == 0, result.stderr
    header = json.loads(run("info", extended).stdout)
    assert header["train"]["n_train"] == 5 + 3 and header["config"]["seed"] == 3
    result = run("fit", category / "test" / "good", "--add", model_file, "-o", extended, "--seed", "1")
    assert result.returncode != 0 and "--add keeps" in result.stderr


def test_several_backbones_fit_an_ensemble(category, tmp_path):
    model = tmp_path / "ens.safetensors"
    result = run("fit", category, "-o", model, *FAST, "--backbone", "efficientnet_lite0", "efficientnet_lite1")
    assert result.returncode == 0, result.stderr
    header = json.loads(run("info", model).stdout)
    assert header["format"] == "patchcore-ensemble" and len(header["members"]) == 2
    out = tmp_path / "p"
    assert run("predict", model, category / "test", "-o", out, "--maps").returncode == 0
    assert len(read_csv(out / "scores.csv")) == 6 and (out / "maps" / "blob" / "000.npy").is_file()
    result = run("evaluate", category, "-o", tmp_path / "e", "--model", model)
    assert result.returncode == 0, result.stderr


def test_calibrate_f1_fpr_and_by_hand(model_file, category, tmp_path):
    out = tmp_path / "cal.safetensors"
    good, bad = category / "test" / "good", category / "test" / "blob"
    result = run("calibrate", model_file, "-o", out, "--f1", "--good", good, "--defective", bad)
    assert result.returncode == 0, result.stderr
    thresholds = json.loads(run("info", out).stdout)["thresholds"]
    assert thresholds["method"] == "f1" and thresholds["image"] > 0
    p = tmp_path / "p"
    assert run("predict", out, category / "test", "-o", p).returncode == 0
    rows = read_csv(p / "scores.csv")
    assert all((r["is_anomalous"] == "true") == ("blob" in r["path"]) for r in rows)  # separable data: F1 = 1
    assert run("calibrate", model_file, "-o", out, "--fpr", "0.3", "--good", good).returncode == 0
    assert json.loads(run("info", out).stdout)["thresholds"]["method"] == "fpr"
    assert run("calibrate", model_file, "-o", out, "--threshold", "2.5").returncode == 0
    assert json.loads(run("info", out).stdout)["thresholds"]["image"] == 2.5
    result = run("calibrate", model_file, "-o", out, "--f1", "--good", good)
    assert result.returncode != 0 and "--defective" in result.stderr


def test_fit_add_and_calibrate_work_on_ensembles(category, tmp_path):
    model = tmp_path / "ens.safetensors"
    fitted = run(
        "fit",
        category,
        "-o",
        model,
        *FAST,
        "--backbone",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "--threshold-fpr",
        "0.25",
        "--calibration-share",
        "0.4",
    )
    assert fitted.returncode == 0, fitted.stderr
    header = json.loads(run("info", model).stdout)
    assert header["thresholds"]["method"] == "fpr" and header["ensemble"]["threshold_fpr"] == 0.25
    result = run("fit", category / "test" / "good", "--add", model, "-o", model)
    assert result.returncode == 0, result.stderr
    header = json.loads(run("info", model).stdout)
    assert header["ensemble"]["n_train"] == 3 + 3 and all(m["train"]["n_train"] == 6 for m in header["members"])
    result = run("calibrate", model, "-o", model, "--threshold", "-0.25")
    assert result.returncode == 0, result.stderr
    assert json.loads(run("info", model).stdout)["thresholds"]["image"] == -0.25
    out = tmp_path / "p"
    assert run("predict", model, category / "test", "-o", out).returncode == 0
    rows = read_csv(out / "scores.csv")
    assert all(r["threshold"] == "-0.25" and r["is_anomalous"] in ("true", "false") for r in rows)
