"""The evaluation report: one self-contained HTML file (inline CSS, PNGs as base64 data URIs, no scripts,
nothing fetched from anywhere), with the metrics table, ROC and PRO curves, score histograms and the
worst false positives and false negatives with their heatmap overlays.

:func:`render_report` is pure (dicts and arrays in, a string out). Plots are drawn with matplotlib's Agg
canvas directly (``FigureCanvasAgg``, no pyplot, so no global backend state is touched or needed).
:class:`ExampleCollector` watches the maps of an evaluation as they are computed (no second inference),
keeps those of the worst images only, and draws them exactly as ``OUT/overlays/`` does, with the same
colour range.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.thresholds import Thresholds
from ..evaluation.metrics import one_against_good, roc_curve
from .overlays import RunRange, colorize, render_overlay, thumbnail, to_png_bytes

GOOD_COLOR = "#1f77b4"
DEFECT_COLOR = "#d62728"
THRESHOLD_COLOR = "#222222"
TYPE_COLORS = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
THUMBNAIL_SIDE = 256

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1a1a1a; background: #fff; padding: 0 16px; line-height: 1.4; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 32px; border-bottom: 1px solid #ddd; }
p.sub { color: #555; margin-top: 0; }
table.metrics { border-collapse: collapse; font-size: 15px; min-width: 480px; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 5px 12px; text-align: left; }
table.metrics th { background: #f2f2f2; font-weight: 600; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: Menlo, Consolas, monospace; }
table.metrics tr.section th { background: #e4ebf5; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
.plots figure { margin: 0; } .plots img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #444; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 14px; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: 8px; background: #fafafa; }
.example .pair { display: flex; gap: 6px; } .example .pair img { width: 50%; height: auto; image-rendering: auto; }
.example .meta { font-size: 13px; margin-top: 6px; word-break: break-all; }
.example .meta b { font-family: Menlo, Consolas, monospace; }
.flag { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 12px; color: #fff; }
.flag.yes { background: #c0392b; } .flag.no { background: #2e7d32; }
.legend { font-size: 14px; color: #444; }
.colorbar { height: 14px; width: 320px; border: 1px solid #999; vertical-align: middle; }
details { margin-top: 12px; } pre { background: #f6f6f6; padding: 10px; font-size: 13px; overflow-x: auto; }
"""


# ----------------------------------------------------------------------------- plots
def _figure(width: float = 6.4, height: float = 4.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _style(axes, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=14)
    axes.set_xlabel(xlabel, fontsize=12)
    axes.set_ylabel(ylabel, fontsize=12)
    axes.tick_params(labelsize=11)
    axes.grid(True, alpha=0.3)


def roc_plot(rows: Sequence[dict], metrics: dict) -> bytes | None:
    """Image-level ROC: all defect types against good, and one thinner curve per defect type."""
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    if labels.size == 0 or labels.min() == labels.max():
        return None
    figure = _figure()
    axes = figure.add_subplot()
    by_type = one_against_good([r["defect_type"] for r in rows])
    if len(by_type) > 1:
        for i, (defect_type, chosen) in enumerate(by_type.items()):
            fpr, tpr, _ = roc_curve(labels[chosen], scores[chosen])
            auc = metrics.get("image_auroc_by_type", {}).get(defect_type)
            label = f"{defect_type}" + (f" (AUROC {auc:.3f})" if auc is not None else "")
            axes.plot(fpr, tpr, color=TYPE_COLORS[i % len(TYPE_COLORS)], linewidth=1.3, alpha=0.85, label=label)
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = metrics.get("image_auroc")
    axes.plot(
        fpr,
        tpr,
        color="#111111",
        linewidth=2.4,
        label="all defects" + (f" (AUROC {auc:.3f})" if auc is not None else ""),
    )
    axes.plot([0, 1], [0, 1], linestyle=":", color="#888888", linewidth=1, label="chance")
    if metrics.get("false_positive_rate_at_threshold") is not None:
        axes.plot(
            metrics["false_positive_rate_at_threshold"],
            metrics["true_positive_rate_at_threshold"],
            "o",
            markersize=9,
            markerfacecolor="none",
            markeredgecolor=DEFECT_COLOR,
            markeredgewidth=2,
            label="at the threshold",
        )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    _style(axes, "ROC (image level)", "false positive rate (good images flagged)", "true positive rate (defects found)")
    axes.legend(loc="lower right", fontsize=10, framealpha=0.9)
    return _png(figure)


def pro_plot(curve: dict | None, metrics: dict) -> bytes | None:
    """PRO curve (pixel level) up to its max FPR."""
    if not curve:
        return None
    fpr, pro = np.asarray(curve["fpr"], dtype=np.float64), np.asarray(curve["pro"], dtype=np.float64)
    if fpr.size > 4000:  # one point per distinct map value can be millions; keep ~4000 (and the last one)
        keep = np.unique(np.append(np.linspace(0, fpr.size - 1, 4000).astype(np.int64), fpr.size - 1))
        fpr, pro = fpr[keep], pro[keep]
    max_fpr = float(curve.get("max_fpr", fpr[-1] if fpr.size else 0.3))
    figure = _figure()
    axes = figure.add_subplot()
    score = metrics.get("pro")
    axes.plot(
        fpr,
        pro,
        color="#6a3d9a",
        linewidth=2.4,
        label="PRO" + (f" (normalised area {score:.3f})" if score is not None else ""),
    )
    axes.set_xlim(0, max_fpr)
    axes.set_ylim(-0.01, 1.01)
    _style(
        axes,
        f"PRO (pixel level, FPR up to {max_fpr:g})",
        "false positive rate (defect-free pixels)",
        "per-region overlap",
    )
    axes.legend(loc="lower right", fontsize=10, framealpha=0.9)
    return _png(figure)


def histogram_plot(rows: Sequence[dict], threshold: float | None) -> bytes | None:
    """Score histograms of good vs defective test images (shared bins), with the threshold line."""
    scores = np.array([float(r["score"]) for r in rows])
    if scores.size == 0:
        return None
    labels = np.array([int(r["label"]) for r in rows])
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, int(min(50, max(10, math.sqrt(scores.size) * 2))) + 1)
    figure = _figure()
    axes = figure.add_subplot()
    good, bad = scores[labels == 0], scores[labels == 1]
    axes.hist(good, bins=bins, color=GOOD_COLOR, alpha=0.6, label=f"good (n={good.size})")
    axes.hist(bad, bins=bins, color=DEFECT_COLOR, alpha=0.55, label=f"defective (n={bad.size})")
    types = sorted({r["defect_type"] for r in rows if int(r["label"]) == 1})
    if len(types) > 1:
        for i, defect_type in enumerate(types):
            chosen = np.array([r["defect_type"] == defect_type for r in rows])
            axes.hist(
                scores[chosen],
                bins=bins,
                histtype="step",
                linewidth=1.6,
                color=TYPE_COLORS[i % len(TYPE_COLORS)],
                label=f"  {defect_type} (n={int(chosen.sum())})",
            )
    if threshold is not None:
        axes.axvline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=2, label=f"threshold {threshold:.4g}")
    _style(axes, "Image scores: good vs defective", "anomaly score (higher = more anomalous)", "number of images")
    axes.legend(loc="upper right", fontsize=10, framealpha=0.9)
    return _png(figure)


# ----------------------------------------------------------------------------- examples
class ExampleCollector:
    """Keeps, while an evaluation runs, the maps of the ``n`` worst false positives (highest-scoring good
    images) and false negatives (lowest-scoring defective images), and the run's map range.

    Use :meth:`add` as ``evaluate(..., on_map=collector.add)``; then :meth:`examples` draws them. Ties keep
    the earlier image.
    """

    def __init__(self, thresholds: Thresholds | None = None, n: int = 6, scale: str = "distance") -> None:
        self.n = n
        self.range = RunRange(thresholds, scale)
        self.kept: dict[int, tuple[Any, float, np.ndarray, Any]] = {}

    def add(self, index: int, sample: Any, score: float, amap: np.ndarray, geometry: Any) -> None:
        self.range.see(amap)
        # kept at the precision OUT/overlays draws from (float16 while the range waits for the run's end)
        precision = np.float16 if self.range.fixed is None else np.float32
        self.kept[index] = (sample, float(score), np.asarray(amap, dtype=precision), geometry)
        same = [i for i, (s, _, _, _) in self.kept.items() if s.label == sample.label]
        if len(same) > self.n:  # drop the least bad of this kind (on ties, the later image)
            sign = -1.0 if sample.label == 0 else 1.0
            del self.kept[max(same, key=lambda i: (sign * self.kept[i][1], i))]

    def examples(self, rows: Sequence[dict], max_side: int = THUMBNAIL_SIDE) -> list[dict]:
        """The kept images as rows with ``kind``, ``image`` and ``overlay`` thumbnails (uint8 arrays),
        worst first; ``rows`` are the evaluation's rows (one per test image, in order)."""
        vmin, vmax = self.range.range()
        chosen = sorted(
            self.kept, key=lambda i: (-self.kept[i][1] if self.kept[i][0].label == 0 else self.kept[i][1], i)
        )
        examples = []
        for kind, label in (("false positive", 0), ("false negative", 1)):
            for i in (i for i in chosen if self.kept[i][0].label == label):
                sample, _, amap, geometry = self.kept[i]
                pixels, _, overlay = render_overlay(
                    sample.path, amap, geometry, (vmin, vmax), self.range.pixel_threshold
                )
                examples.append(
                    {
                        **rows[i],
                        "kind": kind,
                        "image": thumbnail(np.round(pixels * 255).astype(np.uint8), max_side),
                        "overlay": thumbnail(overlay, max_side),
                        "vmin": vmin,
                        "vmax": vmax,
                    }
                )
        return examples


# ----------------------------------------------------------------------------- HTML
def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="{data_uri(png)}">'


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return html.escape(str(value))
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.4g}"
        return f"{value:.4f}"
    return html.escape(str(value))


def _seconds(value: Any) -> str:
    if value is None:
        return "&ndash;"
    value = float(value)
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def metrics_table(metrics: dict) -> str:
    """The metrics as an HTML table: detection quality, threshold, data and timings."""
    rows: list[tuple[str, str] | str] = ["Image level"]
    rows.append(("image AUROC (all defect types vs good)", _fmt(metrics.get("image_auroc"))))
    for defect_type, value in sorted((metrics.get("image_auroc_by_type") or {}).items()):
        rows.append((f"image AUROC: {html.escape(str(defect_type))} vs good", _fmt(value)))
    if "pixel_auroc" in metrics or "pro" in metrics:
        rows.append("Pixel level")
        rows.append(("pixel AUROC", _fmt(metrics.get("pixel_auroc"))))
        rows.append(("PRO (normalised area, FPR &le; 0.3)", _fmt(metrics.get("pro"))))
        resolution = metrics.get("pixel_metrics_resolution")
        if isinstance(resolution, (int, float)):
            rows.append(("pixel metrics resolution", f"{int(resolution)} &times; {int(resolution)} px (model maps)"))
        elif isinstance(resolution, (list, tuple)) and len(resolution) == 2:
            rows.append(
                ("pixel metrics resolution", f"{int(resolution[0])} &times; {int(resolution[1])} px (model maps)")
            )
        elif resolution:
            rows.append(("pixel metrics resolution", html.escape(str(resolution))))
    thresholds = metrics.get("thresholds") or {}
    if metrics.get("threshold") is not None or thresholds.get("pixel") is not None:
        rows.append("Threshold")
        rows.append(("image threshold", _fmt(metrics.get("threshold"))))
        if metrics.get("false_positive_rate_at_threshold") is not None:
            rows.append(
                ("false positive rate at the threshold (test)", _fmt(metrics["false_positive_rate_at_threshold"]))
            )
            rows.append(
                ("true positive rate at the threshold (test)", _fmt(metrics["true_positive_rate_at_threshold"]))
            )
        rows.append(("pixel threshold", _fmt(thresholds.get("pixel"))))
        method = thresholds.get("method")
        if method == "fpr":
            rows.append(
                (
                    "set by",
                    f"calibration: FPR {_fmt(thresholds.get('fpr'))} on "
                    f"{_fmt(thresholds.get('n_calibration'))} held-out good training images",
                )
            )
        elif method:
            rows.append(("set by", html.escape(str(method))))
    else:
        rows.append("Threshold")
        rows.append(("image / pixel threshold", "none (fit with --threshold-fpr or --threshold to set one)"))
    rows.append("Data")
    for key, label in (
        ("n_train", "training images"),
        ("n_test", "test images"),
        ("memory_bank_size", "memory bank size (patches)"),
    ):
        if key in metrics:
            rows.append((label, _fmt(metrics[key])))
    rows.append("Timings")
    for key, label in (
        ("feature_seconds", "feature extraction"),
        ("coreset_seconds", "coreset selection"),
        ("fit_seconds", "fit (total)"),
        ("predict_seconds_per_image", "prediction per image"),
    ):
        if key in metrics:
            rows.append((label, _seconds(metrics[key])))
    body = []
    for row in rows:
        if isinstance(row, str):
            body.append(f'<tr class="section"><th colspan="2">{row}</th></tr>')
        else:
            numeric = row[1][:1].isdigit() or row[1].startswith(("-", "&ndash;"))
            body.append(f"<tr><td>{row[0]}</td><td{' class=num' if numeric else ''}>{row[1]}</td></tr>")
    return '<table class="metrics">\n' + "\n".join(body) + "\n</table>"


def _example_card(example: dict) -> str:
    score = float(example["score"])
    flagged = example.get("is_anomalous")
    flag = ""
    if flagged is not None:
        flag = '<span class="flag yes">flagged</span>' if flagged else '<span class="flag no">passed</span>'
    pictures = []
    if example.get("image") is not None:
        pictures.append(_img(to_png_bytes(np.asarray(example["image"])), "image " + str(example["path"])))
    if example.get("overlay") is not None:
        pictures.append(_img(to_png_bytes(np.asarray(example["overlay"])), "overlay " + str(example["path"])))
    return (
        '<div class="example"><div class="pair">' + "".join(pictures) + "</div>"
        f'<div class="meta">score <b>{score:.4f}</b> {flag} &middot; {html.escape(str(example.get("defect_type", "")))}'
        "<br>"
        f"{html.escape(str(example['path']))}</div></div>"
    )


def _examples_section(title: str, explanation: str, examples: list[dict]) -> str:
    if not examples:
        return f"<h2>{html.escape(title)}</h2><p>None.</p>"
    cards = "\n".join(_example_card(e) for e in examples)
    return f'<h2>{html.escape(title)}</h2><p class="legend">{explanation}</p><div class="examples">\n{cards}\n</div>'


def _colorbar(vmin: float, vmax: float) -> str:
    ramp = np.repeat(colorize(np.linspace(vmin, vmax, 320)[None, :], vmin, vmax), 14, axis=0)
    png = to_png_bytes(np.round(ramp * 255).astype(np.uint8))
    return (
        f'<span class="legend">{_fmt(vmin)}</span> {_img(png, "colour scale", "colorbar")} '
        f'<span class="legend">{_fmt(vmax)}</span>'
    )


def render_report(
    metrics: dict, rows: list[dict], curves: dict, examples: list[dict], *, title: str | None = None
) -> str:
    """One self-contained HTML page.

    ``metrics``: as written to metrics.json (optionally with ``thresholds``, the model's thresholds dict,
    ``dataset`` and ``config``); ``rows``: one dict per test image (``path``, ``score``, ``label``,
    ``defect_type``, optionally ``is_anomalous``); ``curves``: optional ``"pro"`` ``{"fpr", "pro", "max_fpr"}``
    (the ROC is computed from the rows); ``examples``: rows with ``kind`` ("false positive" or
    "false negative") and uint8 ``image`` / ``overlay`` arrays (see :class:`ExampleCollector`).
    """
    threshold = metrics.get("threshold")
    name = metrics.get("dataset")
    heading = title or ("PatchCore evaluation" + (f": {name}" if name else ""))
    plots = []
    for png, caption in (
        (
            roc_plot(rows, metrics),
            "Image-level ROC over all test images; thin lines: each defect type against the good images.",
        ),
        (
            pro_plot((curves or {}).get("pro"), metrics),
            "Per-region overlap against the pixel false positive rate, at the model's input resolution.",
        ),
        (
            histogram_plot(rows, threshold),
            "Image scores of the good and defective test images"
            + (" with the image threshold (dashed)." if threshold is not None else "."),
        ),
    ):
        if png is not None:
            plots.append(f"<figure>{_img(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    false_positives = [e for e in examples if e.get("kind") == "false positive"]
    false_negatives = [e for e in examples if e.get("kind") == "false negative"]
    overlay_note = "Each pair: the image, then its anomaly map over it (blue = normal, red = anomalous"
    ranged = next((e for e in examples if e.get("vmax") is not None), None)
    pixel_threshold = (metrics.get("thresholds") or {}).get("pixel")
    overlay_note += (
        ", white outline = pixels at or above the pixel threshold)." if pixel_threshold is not None else ")."
    )
    if ranged is not None:
        overlay_note += "<br>Colour scale (anomaly map value), the same for every picture: " + _colorbar(
            float(ranged["vmin"]), float(ranged["vmax"])
        )
    config = metrics.get("config")
    config_block = (
        f"<details><summary>Model settings</summary><pre>{html.escape(_json(config))}</pre></details>" if config else ""
    )
    n_good = sum(1 for r in rows if int(r["label"]) == 0)
    n_bad = len(rows) - n_good
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(heading)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>{html.escape(heading)}</h1>",
            f'<p class="sub">{n_good} good and {n_bad} defective test images. Scores: higher = more anomalous.</p>',
            "<h2>Metrics</h2>",
            metrics_table(metrics),
            config_block,
            "<h2>Curves and score distributions</h2>",
            '<div class="plots">' + "\n".join(plots) + "</div>",
            _examples_section(
                "Worst false positives",
                "The highest-scoring <b>good</b> images, worst first. " + overlay_note,
                false_positives,
            ),
            _examples_section(
                "Worst false negatives",
                "The lowest-scoring <b>defective</b> images, worst first. " + overlay_note,
                false_negatives,
            ),
            "</body></html>",
            "",
        ]
    )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=str)
