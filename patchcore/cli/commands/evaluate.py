"""``patchcore evaluate``: fit on a data set's training split (or load a model) and evaluate on its test split."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ...errors import PatchCoreError
from ...reporting.files import with_extension, write_csv, write_json, write_text
from ...reporting.overlays import OverlayWriter, sample_names
from ..options import (
    OVERLAY_HELP,
    RESULT_KEYS,
    add_config_flags,
    add_folder_flags,
    add_runtime_flags,
    check_output_folder,
    check_planned_outputs,
    dataset_from_args,
    load_scorer,
    make_detector,
    refuse_model_settings,
)

NAME = "evaluate"
HELP = "fit on the training split (or load --model) and evaluate on the test split"
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", nargs="?", help="MVTec/MPDD/BTAD or VisA category, or 'textile'")
    add_folder_flags(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument(
        "--model", metavar="MODEL", help="evaluate this model (a model file or an .onnx export) instead of fitting one"
    )
    parser.add_argument(
        "--overlays", action="store_true", help=f"write OUT/overlays/<defect type>/<file name>.png: {OVERLAY_HELP}"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write OUT/report.html, one self-contained page: metrics, ROC and PRO curves, score histograms, "
        "the worst false positives and false negatives with their overlays",
    )
    add_config_flags(parser)
    add_runtime_flags(parser)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_output_folder(out, [Path(p) for p in (args.model, args.data, args.good, args.defective, args.masks) if p])
    learner = None
    if args.model:  # settings and model first: a bad one is refused before any image is read
        refuse_model_settings(args, "--model takes its settings from the model file")
        detector = load_scorer(args.model, args)
    else:
        detector = learner = make_detector(args)
    dataset = dataset_from_args(args)
    if not dataset.test:
        raise PatchCoreError(
            f"{args.data}: no test split to evaluate; use an MVTec-layout folder with test/<type>/ images, or 'textile'"
        )
    names = sample_names(dataset.test)
    planned = [out / name for name in ("scores.csv", "results.jsonl", "metrics.json", "report.html")]
    planned += [out / folder / with_extension(name, ".png") for name in names for folder in ("overlays", "masks")]
    images = [*dataset.train, *(s.path for s in dataset.test), *(s.mask_path for s in dataset.test if s.mask_path)]
    check_planned_outputs(planned, [Path(p) for p in (args.model, *images) if p])
    if learner is not None:
        detector = learner = make_detector(args, dataset.train)  # the geometry chosen from the images unless fixed
        learner.fit(dataset.train)
    watchers = []
    if args.overlays:
        overlays = OverlayWriter(out, detector.thresholds_, detector.score_scale)
        watchers.append(lambda i, sample, score, amap, geometry: overlays.add(sample.path, names[i], amap, geometry))
    if args.report:
        from ...reporting.html import ExampleCollector

        examples = ExampleCollector(detector.thresholds_, scale=detector.score_scale)
        watchers.append(examples.add)

    def on_map(*seen) -> None:
        for watch in watchers:
            watch(*seen)

    curves: dict = {}
    from ...evaluation.evaluate import evaluate  # torch: only when the command runs

    metrics, rows = evaluate(detector, dataset, on_map=on_map if watchers else None, curves=curves)
    if args.overlays:
        overlays.finish()
    metrics["config"] = detector.describe()
    write_csv(out / "scores.csv", [*RESULT_KEYS, "label", "defect_type"], rows)
    write_text(
        out / "results.jsonl",
        "".join(
            json.dumps({key: row.get(key) for key in (*RESULT_KEYS, "label", "defect_type")}) + "\n" for row in rows
        ),
    )
    write_json(out / "metrics.json", metrics)
    if args.report:
        from ...reporting.html import render_report

        details = {**metrics, "thresholds": detector.thresholds_.to_dict(), "dataset": dataset.name}
        write_text(out / "report.html", render_report(details, rows, curves, examples.examples(rows)))
        logger.info("wrote %s", out / "report.html")
    summary = {k: v for k, v in metrics.items() if k != "config"}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
