"""Command line: ``patchcore fit | predict | evaluate | info``.

Model flags map one to one onto :class:`PatchCoreConfig` fields (``--coreset-ratio`` -> ``coreset_ratio``).
Problems the user can fix end in one ``patchcore: error: ...`` line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from . import __version__
from .config import CORESET_METHODS, NORMALIZATIONS, SCORING_MODES, PatchCoreConfig
from .errors import PatchCoreError
from .model import PatchCore
from .search import SEARCH_BACKENDS
from .serialization import load_any

logger = logging.getLogger("patchcore")

CHOICES = {"scoring": SCORING_MODES, "coreset_method": CORESET_METHODS, "normalization": NORMALIZATIONS}
EXIT_ERROR = 1
EXIT_PARTIAL = 3  # predict wrote results, but some inputs could not be read
OVERLAY_HELP = (
    "heatmap overlay at the image's original size, colours fixed for the whole run (0.75 to 1.25 x the pixel "
    "threshold; without thresholds the run's smallest to largest map value), white outline where the map reaches "
    "the pixel threshold; "
    "and OUT/masks/<same name>.png, the binary mask at the model's pixel threshold (skipped with one warning "
    "when the model has none: fit with --threshold-fpr or --pixel-threshold)"
)
RESULT_KEYS = ("path", "score", "threshold", "is_anomalous", "normalized_score")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PatchCoreConfig field; absent flags leave no attribute, so only given flags override."""
    group = parser.add_argument_group("model settings (saved in the model file)")
    group.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (keys as the flags below); flags win")
    hints = typing.get_type_hints(PatchCoreConfig)
    for field in dataclasses.fields(PatchCoreConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = str(hints[field.name])
        kwargs: dict = {"dest": field.name, "default": argparse.SUPPRESS, "help": f"default: {field.default}"}
        if field.name == "layers":
            kwargs.update(nargs="+", metavar="LAYER", help="feature layers, finest first (default: the backbone's)")
        elif field.name == "backbone":
            kwargs.update(nargs="+", metavar="NAME", help="backbone; several names fit an ensemble, one bank each (default: efficientnet_lite0)")
        elif field.name in CHOICES:
            kwargs.update(choices=CHOICES[field.name])
        elif hints[field.name] is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif "None" in hint and "int" in hint:
            kwargs.update(type=_optional_int, metavar="N|none")
        elif "int" in hint:
            kwargs.update(type=int)
        elif "float" in hint:
            kwargs.update(type=float)
        group.add_argument(flag, **kwargs)


def given_settings(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(PatchCoreConfig) if hasattr(args, f.name)}


def read_config_file(path: str) -> dict:
    """Settings from a YAML or JSON file whose keys are PatchCoreConfig fields (or their flag spellings)."""
    file = Path(path)
    if not file.is_file():
        raise PatchCoreError(f"{file}: no such config file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise PatchCoreError(f"{file}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PatchCoreError(f"{file}: expected a mapping of settings, e.g. 'coreset_ratio: 0.1'")
    settings = {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}
    if isinstance(settings.get("layers"), str):
        settings["layers"] = settings["layers"].split()
    return settings


def configs_from_args(args: argparse.Namespace) -> list[PatchCoreConfig]:
    """Defaults, then the --config file, then the flags given on the command line; one config per backbone."""
    settings = {**(read_config_file(args.config) if getattr(args, "config", None) else {}), **given_settings(args)}
    backbones = settings.pop("backbone", None) or [PatchCoreConfig.backbone]
    backbones = [backbones] if isinstance(backbones, str) else list(backbones)
    if len(backbones) > 1 and settings.get("layers"):
        raise PatchCoreError("--layers cannot apply to several backbones: drop it to use each backbone's defaults")
    return [PatchCoreConfig.from_dict({**settings, "backbone": name}) for name in backbones]


def make_model(args: argparse.Namespace, runtime: dict):
    """A PatchCore model, or an ensemble when several backbones are named."""
    configs = configs_from_args(args)
    if len(configs) == 1:
        return PatchCore(configs[0], **runtime)
    from .ensemble import PatchCoreEnsemble

    return PatchCoreEnsemble(configs, seed=configs[0].seed, calibration_share=configs[0].calibration_share, **runtime)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime (never changes results)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    group.add_argument("--batch-size", type=int, default=None, help="images processed together (default: 32; on a CPU the backbone runs them in slices of ~200k pixels)")
    group.add_argument(
        "--search", choices=SEARCH_BACKENDS, default="exact",
        help="nearest-neighbour backend (default: exact, through a bf16 shortlist where the CPU has native bf16; "
        "exact-fp32: plain fp32 GEMM; faiss-* need pip install 'patchcore[faiss]'; ivf/hnsw are approximate)",
    )


def add_folder_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plain folders (instead of DATA)")
    group.add_argument("--good", metavar="DIR", help="good images; with --defective a seeded 20%% are held out for testing")
    group.add_argument("--defective", metavar="DIR", help="defective images (sub-folders become defect types)")
    group.add_argument("--masks", metavar="DIR", help="masks named like the defective images (<name>.png or <name>_mask.png)")


def dataset_from_args(args: argparse.Namespace):
    from .data import folders, open_dataset

    if args.good:
        if args.data:
            raise PatchCoreError("give either DATA or --good DIR, not both")
        return folders(args.good, args.defective, args.masks, seed=getattr(args, "seed", 0))
    if args.defective or args.masks:
        raise PatchCoreError("--defective and --masks need --good DIR")
    if not args.data:
        raise PatchCoreError("name the data: DATA (a folder or 'textile') or --good DIR")
    return open_dataset(args.data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore", description="PatchCore anomaly detection (Roth et al., 2022).")
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on good images")
    fit.add_argument("data", metavar="DATA", nargs="?", help="MVTec/MPDD/BTAD or VisA category (its training images), a folder of good images, or 'textile'")
    add_folder_flags(fit)
    fit.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    fit.add_argument("--add", metavar="MODEL", help="add DATA's good images to this fitted model (incremental; may equal -o)")
    add_config_flags(fit)
    add_runtime_flags(fit)

    predict = sub.add_parser("predict", help="score images with a fitted model")
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    predict.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    predict.add_argument("--maps", action="store_true", help="write OUT/maps/<relative path>.npy anomaly maps")
    predict.add_argument("--overlays", action="store_true", help=f"write OUT/overlays/<relative path>.png: {OVERLAY_HELP}")
    add_runtime_flags(predict)

    evaluate = sub.add_parser("evaluate", help="fit on the training split (or load --model) and evaluate on the test split")
    evaluate.add_argument("data", metavar="DATA", nargs="?", help="MVTec/MPDD/BTAD or VisA category, or 'textile'")
    add_folder_flags(evaluate)
    evaluate.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    evaluate.add_argument("--model", metavar="MODEL", help="evaluate this model instead of fitting one")
    evaluate.add_argument("--overlays", action="store_true", help=f"write OUT/overlays/<defect type>/<file name>.png: {OVERLAY_HELP}")
    evaluate.add_argument(
        "--report", action="store_true",
        help="write OUT/report.html, one self-contained page: metrics, ROC and PRO curves, score histograms, "
             "the worst false positives and false negatives with their overlays",
    )
    add_config_flags(evaluate)
    add_runtime_flags(evaluate)

    calibrate = sub.add_parser("calibrate", help="set a fitted model's thresholds from images it was not fitted on, or by hand")
    calibrate.add_argument("model", metavar="MODEL")
    calibrate.add_argument("-o", "--output", required=True, metavar="OUT_MODEL", help="model file to write (may equal MODEL)")
    how = calibrate.add_mutually_exclusive_group(required=True)
    how.add_argument("--fpr", type=float, metavar="RATE", help="flag this share of the --good images (and of their pixels)")
    how.add_argument("--f1", action="store_true", help="F1-optimal image threshold on --good and --defective images")
    how.add_argument("--threshold", type=float, metavar="VALUE", help="image threshold by hand")
    calibrate.add_argument("--pixel-threshold", type=float, metavar="VALUE", help="pixel threshold by hand (with --threshold)")
    calibrate.add_argument("--good", metavar="DIR", help="good images not used in fit")
    calibrate.add_argument("--defective", metavar="DIR", help="defective images (for --f1)")
    add_runtime_flags(calibrate)

    info = sub.add_parser("info", help="print a model file's settings and provenance")
    info.add_argument("model", metavar="MODEL")
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    dataset = dataset_from_args(args)
    runtime = dict(device=args.device, batch_size=args.batch_size, search=args.search, progress=True)
    if args.add:
        if given_settings(args) or args.config:
            raise PatchCoreError("--add keeps the model's settings: drop the model settings flags")
        model = PatchCore.load(args.add, **runtime).partial_fit(dataset.train)
    else:
        model = make_model(args, runtime).fit(dataset.train)
    model.save(args.output)
    stats = model.fit_stats_
    logger.info(
        "fitted on %d images in %.1f s: memory bank %d of %d patches; wrote %s",
        model.n_train_, stats["fit_seconds"], model.memory_bank_size, stats["full_bank_size"], args.output,
    )
    return 0


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image path, path relative to its INPUT) for every image named or found under a folder."""
    from .images import list_images

    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise PatchCoreError(f"{path}: no images in this folder")
            found += [(p, p.relative_to(path)) for p in images]
        elif path.exists():
            found.append((path, Path(path.name)))
        else:
            raise PatchCoreError(f"{path}: no such file or folder")
    seen: dict[Path, Path] = {}
    for image, relative in found:
        if relative in seen and seen[relative] != image:
            raise PatchCoreError(f"{image} and {seen[relative]} would write the same map name {relative}: predict them separately")
        seen[relative] = image
    return found


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import load_image, map_to_original
    from .overlays import OverlayWriter
    from .reports import write_csv, write_npy, write_text

    model = load_any(args.model, device=args.device, batch_size=args.batch_size, search=args.search, progress=True)
    inputs = collect_inputs(args.inputs)
    out = Path(args.output)
    rows: list[dict] = []
    failed = 0
    batch: list[tuple[Path, Path, np.ndarray]] = []
    overlays = OverlayWriter(out, getattr(model, "thresholds_", None)) if args.overlays else None
    with_maps = args.maps or overlays is not None

    def flush() -> None:
        images = [image for _, _, image in batch]
        results = model.predict_with_input_maps(images) if with_maps else ((s, None, None) for s in model.score_samples(images))
        for (path, relative, image), (score, amap, geometry) in zip(batch, results):
            if args.maps:
                write_npy(out / "maps" / relative.with_suffix(".npy"), map_to_original(amap, geometry).astype(np.float32))
            if overlays is not None:
                overlays.add(image, relative, amap, geometry, path=path)
            rows.append({"path": str(path), "score": float(score), **model.decide(float(score)), "error": ""})
        batch.clear()

    for path, relative in inputs:
        try:
            batch.append((path, relative, load_image(path)))
        except PatchCoreError as exc:
            failed += 1
            print(f"patchcore: error: {exc}", file=sys.stderr)
            rows.append({"path": str(path), "score": None, "error": str(exc)})
        if len(batch) >= (args.batch_size or 32):
            flush()
    if batch:
        flush()
    if overlays is not None:
        overlays.finish()
    order = {str(p): i for i, (p, _) in enumerate(inputs)}
    rows.sort(key=lambda row: order[row["path"]])
    write_csv(out / "scores.csv", ["path", "score", "threshold", "is_anomalous", "normalized_score", "error"], rows)
    write_text(out / "results.jsonl", "".join(
        json.dumps({**{key: row.get(key) for key in RESULT_KEYS}, "error": row.get("error") or None}) + "\n" for row in rows
    ))
    logger.info("scored %d of %d images; wrote %s", len(rows) - failed, len(rows), out / "scores.csv")
    if failed:
        print(f"patchcore: error: {failed} of {len(rows)} images could not be read (see the error column of {out / 'scores.csv'})", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .overlays import OverlayWriter, sample_names
    from .reports import write_csv, write_json, write_text

    dataset = dataset_from_args(args)
    if not dataset.test:
        raise PatchCoreError(f"{args.data}: no test split to evaluate; use an MVTec-layout folder with test/<type>/ images, or 'textile'")
    if args.model:
        if given_settings(args) or args.config:
            raise PatchCoreError("--model takes its settings from the model file: drop the model settings flags")
        model = load_any(args.model, device=args.device, batch_size=args.batch_size, search=args.search, progress=True)
    else:
        runtime = dict(device=args.device, batch_size=args.batch_size, search=args.search, progress=True)
        model = make_model(args, runtime).fit(dataset.train)
    out = Path(args.output)
    on_map = None
    if args.overlays:
        overlays = OverlayWriter(out, getattr(model, "thresholds_", None))
        names = sample_names(dataset.test)

        def on_map(i, sample, score, amap, geometry) -> None:
            overlays.add(sample.path, names[i], amap, geometry)

    curves: dict = {}
    metrics, rows = evaluate(model, dataset, on_map=on_map, curves=curves)
    if args.overlays:
        overlays.finish()
    members = getattr(model, "members", None)
    metrics["config"] = [c.to_dict() for c in members] if members else model.config.to_dict()
    write_csv(out / "scores.csv", ["path", "score", "threshold", "is_anomalous", "normalized_score", "label", "defect_type"], rows)
    write_text(out / "results.jsonl", "".join(
        json.dumps({key: row.get(key) for key in (*RESULT_KEYS, "label", "defect_type")}) + "\n" for row in rows
    ))
    write_json(out / "metrics.json", metrics)
    if args.report:
        from .html_report import build_examples, render_report

        details = {**metrics, "thresholds": getattr(model, "thresholds_", None), "dataset": dataset.name}
        write_text(out / "report.html", render_report(details, rows, curves, build_examples(model, rows)))
        logger.info("wrote %s", out / "report.html")
    summary = {k: v for k, v in metrics.items() if k != "config"}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .data import image_folder

    model = PatchCore.load(args.model, device=args.device, batch_size=args.batch_size, search=args.search, progress=True)
    if args.threshold is not None:
        model.set_threshold(args.threshold, args.pixel_threshold)
    elif not args.good:
        raise PatchCoreError("--fpr and --f1 need --good DIR (good images the model was not fitted on)")
    elif args.f1:
        if not args.defective:
            raise PatchCoreError("--f1 needs --defective DIR as well")
        model.calibrate_f1(image_folder(args.good).train, image_folder(args.defective).train)
    else:
        model.calibrate(image_folder(args.good).train, args.fpr)
    model.save(args.output)
    logger.info("thresholds: %s; wrote %s", model.thresholds_, args.output)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .serialization import read_header

    print(json.dumps(read_header(args.model), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if args.command in ("fit", "evaluate", "predict", "calibrate") and args.verbose is False:
        logging.getLogger("patchcore").setLevel(logging.INFO)
    commands = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "info": cmd_info}
    try:
        return commands[args.command](args)
    except PatchCoreError as exc:
        print(f"patchcore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("patchcore: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
