"""Reports: heatmap overlays, binary masks, results.jsonl and the self-contained HTML report."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli as run
from patchcore.datasets import Dataset, Sample
from patchcore.evaluation.evaluate import evaluate
from patchcore.reporting.html import ExampleCollector, render_report
from patchcore.reporting.overlays import (
    OverlayWriter,
    binary_mask,
    heatmap_overlay,
    overlay_range,
    sample_names,
    save_png,
    thumbnail,
)
from synthetic import make_mvtec

FAST = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.5"]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def hot_spot(size=(40, 50)):
    image = np.full((*size, 3), 0.5, np.float32)
    amap = np.zeros(size, np.float32)
    amap[10:20, 20:30] = 4.0
    return image, amap


# ----------------------------------------------------------------------------- overlays
def test_overlay_shape_dtype_and_hot_spot_colour():
    image, amap = hot_spot()
    out = heatmap_overlay(image, amap, vmin=0.0, vmax=4.0)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    hot, cold = out[15, 25].astype(int), out[35, 5].astype(int)
    assert hot[0] > hot[2] + 40  # red-ish where the map is high
    assert cold[2] > cold[0] + 10  # blue-ish where it is low
    assert np.abs(hot - cold).sum() > 100
    # a fixed range: the same value gets the same colour whatever else is in the map
    other = amap.copy()
    other[0:5, 0:5] = 100.0
    assert (heatmap_overlay(image, other, vmin=0.0, vmax=4.0)[35, 5] == out[35, 5]).all()


def test_overlay_draws_the_threshold_outline_in_white():
    image, amap = hot_spot()
    plain = heatmap_overlay(image, amap, vmin=0.0, vmax=8.0)
    outlined = heatmap_overlay(image, amap, vmin=0.0, vmax=8.0, threshold=2.0)
    white = (outlined == 255).all(axis=-1)
    assert white[10, 20:30].all() and white[10:20, 20].all()  # the region's border
    assert not white[15, 25] and not white[35, 5]  # not inside, not outside
    assert (outlined[~white] == plain[~white]).all()


def test_overlay_rejects_mismatched_sizes():
    image, amap = hot_spot()
    with pytest.raises(ValueError):
        heatmap_overlay(image, amap[:-1], vmin=0, vmax=1)


def test_binary_mask():
    amap = np.array([[0.1, 0.5], [0.49, 2.0]])
    mask = binary_mask(amap, 0.5)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255], [0, 255]]


def test_overlay_range():
    assert overlay_range(2.0, 3.0) == (1.5, 2.5)  # pixel threshold in the middle of the scale
    assert overlay_range(None, 4.0) == (3.0, 5.0)
    assert overlay_range(None, None) is None
    assert overlay_range(None, None, run_max=7.0, run_min=2.0) == (2.0, 7.0)


def test_save_png_round_trips_and_leaves_no_temporary(tmp_path):
    image, amap = hot_spot()
    array = heatmap_overlay(image, amap, vmin=0, vmax=4)
    save_png(tmp_path / "sub" / "a.png", array)
    assert (np.asarray(Image.open(tmp_path / "sub" / "a.png")) == array).all()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]


def test_overlay_writer_without_thresholds_waits_for_the_run_maximum(tmp_path, fitted, rng_images):
    writer = OverlayWriter(tmp_path, fitted.thresholds_)
    for i, result in enumerate(fitted.infer(rng_images[:2])):
        writer.add(rng_images[i], f"img{i}", result.input_map, result.geometry)
    assert not (tmp_path / "overlays").exists()
    writer.finish()
    pictures = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert pictures == ["img0.png", "img1.png"] and not (tmp_path / "masks").exists()
    assert np.asarray(Image.open(tmp_path / "overlays" / "img0.png")).shape == rng_images[0].shape


def test_sample_names_are_unique():
    samples = [
        Sample(Path("a/x.png"), 0, "good"),
        Sample(Path("b/x.png"), 0, "good"),
        Sample(Path("c/x.png"), 1, "hole"),
    ]
    assert sample_names(samples) == [Path("good/x"), Path("good/x_1"), Path("hole/x")]


# ----------------------------------------------------------------------------- HTML
def fake_run(n_good=12, n_bad=8):
    rng = np.random.default_rng(0)
    rows = [
        {
            "path": f"data/good/{i:03d}.png",
            "score": float(rng.normal(1, 0.1)),
            "label": 0,
            "defect_type": "good",
            "is_anomalous": None,
        }
        for i in range(n_good)
    ]
    rows += [
        {
            "path": f"data/{t}/{i:03d}.png",
            "score": float(rng.normal(2, 0.4)),
            "label": 1,
            "defect_type": t,
            "is_anomalous": None,
        }
        for t in ("hole", "stain")
        for i in range(n_bad // 2)
    ]
    metrics = {
        "image_auroc": 0.9876,
        "image_auroc_by_type": {"hole": 0.9712, "stain": 1.0},
        "pixel_auroc": 0.9543,
        "pro": 0.8321,
        "pixel_metrics_resolution": 56,
        "n_train": 17,
        "n_test": n_good + n_bad,
        "memory_bank_size": 321,
        "feature_seconds": 1.5,
        "coreset_seconds": 0.25,
        "fit_seconds": 1.8,
        "predict_seconds_per_image": 0.04,
        "threshold": 1.3,
        "false_positive_rate_at_threshold": 0.0833,
        "true_positive_rate_at_threshold": 0.875,
        "thresholds": {"image": 1.3, "pixel": 0.9, "method": "fpr", "fpr": 0.05, "n_calibration": 4},
    }
    fpr = np.linspace(0, 0.3, 50)
    curves = {"pro": {"fpr": fpr, "pro": np.sqrt(fpr / 0.3), "max_fpr": 0.3}}
    return metrics, rows, curves


def test_render_report_is_self_contained_with_tables_plots_and_examples():
    metrics, rows, curves = fake_run()
    image, amap = hot_spot()
    pixels = np.round(image * 255).astype(np.uint8)
    overlay = heatmap_overlay(image, amap, vmin=0, vmax=1.8, threshold=0.9)
    fps = sorted((r for r in rows if r["label"] == 0), key=lambda r: -r["score"])[:2]
    fns = sorted((r for r in rows if r["label"] == 1), key=lambda r: r["score"])[:2]
    examples = [
        {**r, "kind": "false positive", "image": pixels, "overlay": overlay, "vmin": 0, "vmax": 1.8} for r in fps
    ]
    examples += [
        {**r, "kind": "false negative", "image": pixels, "overlay": overlay, "vmin": 0, "vmax": 1.8} for r in fns
    ]
    page = render_report(metrics, rows, curves, examples)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for text in (
        "0.9876",
        "0.9712",
        "0.9543",
        "0.8321",
        "321",
        "hole",
        "stain",
        "1.3000",
        "0.0833",
        "0.8750",
        "40.0 ms",
    ):
        assert text in page, text
    for row in fps + fns:
        assert row["path"] in page
    images = DATA_URI.findall(page)
    # ROC, PRO, histogram, the colour bar twice, and image + overlay for each of 4 examples
    assert len(images) == 3 + 2 + 2 * 4
    for data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).format == "PNG"
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()


def test_render_report_without_masks_or_thresholds_skips_pro_and_threshold():
    metrics, rows, _ = fake_run()
    for key in (
        "pixel_auroc",
        "pro",
        "pixel_metrics_resolution",
        "threshold",
        "false_positive_rate_at_threshold",
        "true_positive_rate_at_threshold",
        "thresholds",
    ):
        metrics.pop(key)
    page = render_report(metrics, rows, {}, [])
    assert len(DATA_URI.findall(page)) == 2  # ROC and histogram
    assert "PRO" not in page and "none (fit with" in page


def test_example_collector_keeps_the_worst_images_only_and_draws_them_like_the_overlays(fitted, tmp_path):
    """The report's examples come from the evaluation's own maps (no second inference), and without
    thresholds use the same run-wide colour range as OUT/overlays: the two pictures agree."""
    rng = np.random.default_rng(3)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    dataset = Dataset("d", [], [Sample(p, int(i >= 3), "good" if i < 3 else "x") for i, p in enumerate(paths)])
    assert fitted.thresholds_.pixel is None
    writer, collector = OverlayWriter(tmp_path / "out", fitted.thresholds_), ExampleCollector(fitted.thresholds_, n=1)
    names = sample_names(dataset.test)

    def on_map(i, sample, score, amap, geometry):
        writer.add(sample.path, names[i], amap, geometry)
        collector.add(i, sample, score, amap, geometry)

    _, rows = evaluate(fitted, dataset, on_map=on_map)
    writer.finish()
    assert len(collector.kept) == 2
    examples = collector.examples(rows)
    good, bad = [r for r in rows if r["label"] == 0], [r for r in rows if r["label"] == 1]
    assert [e["kind"] for e in examples] == ["false positive", "false negative"]
    assert examples[0]["path"] == max(good, key=lambda r: r["score"])["path"]
    assert examples[1]["path"] == min(bad, key=lambda r: r["score"])["path"]
    for example in examples:
        name = names[[str(p) for p in paths].index(example["path"])]
        written = np.asarray(Image.open(tmp_path / "out" / "overlays" / name.with_name(name.name + ".png")))
        np.testing.assert_array_equal(example["overlay"], thumbnail(written, 256))


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("data") / "cat", size=40)


@pytest.fixture(scope="module")
def thresholded_model(category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "model.safetensors"
    result = run("fit", category, "-o", path, *FAST, "--threshold-fpr", "0.2", "--calibration-share", "0.4")
    assert result.returncode == 0, result.stderr
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_overlays_masks_and_jsonl(thresholded_model, category, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(category / "test" / "blob" / "000.png").resize((60, 30)).save(inputs / "wide.png")  # not square
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = run("predict", thresholded_model, category / "test", inputs, "-o", out, "--overlays")
    assert result.returncode == 3 and "broken.png" in result.stderr  # the unreadable image, the rest scored
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 8
    for row in rows:
        assert {"path", "score", "threshold", "is_anomalous", "normalized_score", "error"} <= set(row)
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["score"] is None and "broken.png" in broken["error"]
    good = [r for r in rows if r is not broken]
    assert all(
        isinstance(r["score"], float) and isinstance(r["is_anomalous"], bool) and r["error"] is None for r in good
    )
    for relative, size in (("blob/000.png", (40, 40)), ("good/002.png", (40, 40)), ("wide.png", (60, 30))):
        overlay = Image.open(out / "overlays" / relative)
        mask = Image.open(out / "masks" / relative)
        assert overlay.size == size and overlay.mode == "RGB"
        assert mask.size == size and mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not (out / "overlays" / "broken.png").exists()
    assert list(out.rglob("*.tmp")) == [] and list(out.rglob(".*")) == []


def test_predict_overlays_without_a_pixel_threshold_warn_once_and_skip_masks(fitted, tmp_path, category):
    model = tmp_path / "plain.safetensors"
    fitted.save(model)
    out = tmp_path / "out"
    result = run("predict", model, category / "test" / "blob", "-o", out, "--overlays")
    assert result.returncode == 0, result.stderr
    assert result.stderr.lower().count("pixel threshold") == 1
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["000.png", "001.png", "002.png"]
    assert not (out / "masks").exists()
    assert all(r["threshold"] is None for r in read_jsonl(out / "results.jsonl"))


def test_evaluate_report_and_overlays(thresholded_model, category, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", category, "-o", out, "--model", thresholded_model, "--report", "--overlays")
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['image_auroc']:.4f}" in page and "PRO" in page
    assert len(DATA_URI.findall(page)) >= 3 + 2 * 2
    assert "https://" not in page and "http://" not in page
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 6 and {r["defect_type"] for r in rows} == {"good", "blob"}
    assert {"path", "score", "threshold", "is_anomalous", "normalized_score", "label", "defect_type"} <= set(rows[0])
    assert Image.open(out / "overlays" / "blob" / "001.png").size == (40, 40)
    assert Image.open(out / "masks" / "good" / "000.png").size == (40, 40)


def test_evaluate_report_without_masks(tmp_path):
    category = make_mvtec(tmp_path / "nomask", size=40, masks=False)
    out = tmp_path / "eval"
    result = run("evaluate", category, "-o", out, *FAST, "--report")
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Worst false negatives" in page and "PRO (pixel" not in page
    assert not (out / "overlays").exists()
    assert len(read_jsonl(out / "results.jsonl")) == 6
