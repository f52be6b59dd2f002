"""What ``predict`` writes, whichever engine scored the images: one row per image (``scores.csv`` and
``results.jsonl``, streamed in input order) and the per-image map files (``maps/<name>.npy``)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors.base import Scorer
from ..imaging import map_to_original
from ..persistence import atomic_write
from .files import _cell, with_extension


def scored_row(path: Path, score: float, detector: Scorer) -> dict[str, Any]:
    """The row of a scored image: path, score and the detector's decision (threshold, is_anomalous, ...)."""
    return {"path": str(path), "score": score, **detector.decide(score), "error": ""}


def error_row(path: Path, message: str) -> dict[str, Any]:
    """The row of an image that could not be read."""
    return {"path": str(path), "score": None, "error": message}


def map_path(out: Path, name: Path) -> Path:
    """Where an image's anomaly map goes: ``OUT/maps/<name>.npy``."""
    return out / "maps" / with_extension(name, ".npy")


def write_results(out: str | os.PathLike, keys: Sequence[str], rows: Iterable[dict[str, Any]]) -> int:
    """``OUT/scores.csv`` (columns ``keys`` and ``error``) and ``OUT/results.jsonl`` (one JSON object per row)
    from ``rows``, consumed once as they come (a stream of any length holds one row at a time); each file is
    written atomically (whole or absent). Returns the number of rows."""
    out = Path(out)
    columns = [*keys, "error"]
    count = 0

    def write_table(table_tmp: str) -> None:
        with open(table_tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as table:
            writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()

            def write_lines(lines_tmp: str) -> None:
                nonlocal count
                with open(lines_tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as lines:
                    for row in rows:
                        writer.writerow({k: _cell(v) for k, v in row.items()})
                        record = {**{key: row.get(key) for key in keys}, "error": row.get("error") or None}
                        lines.write(json.dumps(record) + "\n")
                        count += 1

            atomic_write(out / "results.jsonl", write_lines)

    atomic_write(out / "scores.csv", write_table)
    return count


def original_map(input_map: np.ndarray, geometry: Any) -> np.ndarray:
    """An input-resolution map on its original image, float32: what ``maps/<name>.npy`` holds."""
    return map_to_original(input_map, geometry).astype(np.float32)
