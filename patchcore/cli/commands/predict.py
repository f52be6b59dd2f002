"""``patchcore predict``: score image files and folders with a fitted detector; CSV, JSONL, maps, overlays."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ...errors import PatchCoreError
from ...imaging import list_images, load_image, map_to_original
from ...reporting.files import write_csv, write_npy, write_text
from ...reporting.overlays import OverlayWriter
from ..options import OVERLAY_HELP, RESULT_KEYS, add_runtime_flags, load_detector

NAME = "predict"
HELP = "score images with a fitted model"
EXIT_PARTIAL = 3  # results were written, but some inputs could not be read
logger = logging.getLogger("patchcore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--maps", action="store_true", help="write OUT/maps/<relative path>.npy anomaly maps")
    parser.add_argument(
        "--overlays", action="store_true", help=f"write OUT/overlays/<relative path>.png: {OVERLAY_HELP}"
    )
    add_runtime_flags(parser)


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image path, path relative to its INPUT) for every image named or found under a folder."""
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
            raise PatchCoreError(
                f"{image} and {seen[relative]} would write the same map name {relative}: predict them separately"
            )
        seen[relative] = image
    return found


def run(args: argparse.Namespace) -> int:
    detector = load_detector(args.model, args)
    inputs = collect_inputs(args.inputs)
    out = Path(args.output)
    rows: list[dict] = []
    failed = 0
    batch: list[tuple[Path, Path, np.ndarray]] = []
    overlays = OverlayWriter(out, detector.thresholds_, detector.score_scale) if args.overlays else None
    with_maps = args.maps or overlays is not None

    def flush() -> None:
        results = detector.infer([image for _, _, image in batch], maps=with_maps)
        for (path, relative, image), result in zip(batch, results):
            if args.maps:
                write_npy(
                    out / "maps" / relative.with_suffix(".npy"),
                    map_to_original(result.map(), result.geometry).astype(np.float32),
                )
            if overlays is not None:
                overlays.add(image, relative, result.map(), result.geometry, path=path)
            rows.append({"path": str(path), "score": result.score, **detector.decide(result.score), "error": ""})
        batch.clear()

    for path, relative in inputs:
        try:
            batch.append((path, relative, load_image(path)))
        except PatchCoreError as exc:
            failed += 1
            print(f"patchcore: error: {exc}", file=sys.stderr)
            rows.append({"path": str(path), "score": None, "error": str(exc)})
        if len(batch) >= detector.resolved_batch_size():
            flush()
    if batch:
        flush()
    if overlays is not None:
        overlays.finish()
    order = {str(p): i for i, (p, _) in enumerate(inputs)}
    rows.sort(key=lambda row: order[row["path"]])
    write_csv(out / "scores.csv", [*RESULT_KEYS, "error"], rows)
    write_text(
        out / "results.jsonl",
        "".join(
            json.dumps({**{key: row.get(key) for key in RESULT_KEYS}, "error": row.get("error") or None}) + "\n"
            for row in rows
        ),
    )
    logger.info("scored %d of %d images; wrote %s", len(rows) - failed, len(rows), out / "scores.csv")
    if failed:
        where = out / "scores.csv"
        print(
            f"patchcore: error: {failed} of {len(rows)} images could not be read (see the error column of {where})",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return 0
