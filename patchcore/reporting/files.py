"""Report files, each written atomically: a reader never sees a half-written CSV, JSON or map."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..persistence import atomic_write

logger = logging.getLogger(__name__)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically; file names that are not UTF-8 (surrogate-escaped by Python) keep their bytes."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_csv(path: str | os.PathLike, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell: booleans as true/false, floats at full precision, and text that a spreadsheet would run as
    a formula (starting with = + - @, tab or CR) prefixed with an apostrophe.

    >>> [_cell(v) for v in (True, 0.1, -2.5, None, "=HYPERLINK(1)", "-x.png", "a.png")]
    ['true', '0.1', '-2.5', '', "'=HYPERLINK(1)", "'-x.png", 'a.png']
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # full precision, round-trips exactly
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(Path(path), write)


def output_names(relatives: Sequence[Path]) -> list[Path]:
    """One distinct output name per input, without extension: ``maps/<name>.npy``, ``overlays/<name>.png``.

    The name is the input's relative path without its extension. Inputs that differ only in their extension
    (``a.png`` and ``a.jpg``) keep it (``a.png``, ``a.jpg``); a name that is still taken gets ``_1``, ``_2``,
    ...; each such collision is logged. No input's result ever overwrites another's.

    >>> [str(n) for n in output_names([Path("a.png"), Path("a.jpg"), Path("b.png"), Path("b.png"), Path("c.png")])]
    ['a.png', 'a.jpg', 'b', 'b_1', 'c']
    """
    # compared case-folded: a.png and A.jpg are one file name on macOS and Windows
    stems = [Path(str(Path(r).with_suffix("")).casefold()) for r in relatives]
    groups: dict[Path, set[Path]] = {}
    for relative, stem in zip(relatives, stems):
        groups.setdefault(stem, set()).add(Path(relative))
    counts = Counter(stems)
    names: list[Path] = []
    taken: set[str] = set()
    for relative, stem in zip(relatives, stems):
        name = Path(relative) if len(groups[stem]) > 1 else Path(relative).with_suffix("")  # several: keep each
        candidate, n = name, 1
        while str(candidate).casefold() in taken:
            candidate = name.with_name(f"{name.name}_{n}")
            n += 1
        if counts[stem] > 1:
            logger.warning("%s shares its name with another input: its results are named %s", relative, candidate)
        taken.add(str(candidate).casefold())
        names.append(candidate)
    return names


def with_extension(name: Path, extension: str) -> Path:
    """``name`` + ``extension``, keeping any dot already in the name (``a.png`` -> ``a.png.npy``)."""
    return name.with_name(name.name + extension)
