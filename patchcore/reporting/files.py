"""Report files, each written atomically: a reader never sees a half-written CSV, JSON or map."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..persistence import atomic_write


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_csv(path: str | os.PathLike, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # full precision, round-trips exactly
    return "" if value is None else value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(Path(path), write)
