"""Just enough of the ONNX file format to check an exported model without the onnx package.

An ``.onnx`` file is a protobuf ``ModelProto``. The runtime needs two things from it before handing it
to ONNX Runtime: the ``patchcore`` metadata entry, and the bytes of the memory-bank initializer, to check
them against the SHA-256 the metadata records. This walks the protobuf wire format (varints and
length-delimited fields) over a memory map, so a large file is neither copied nor parsed whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import PatchCoreError

# field numbers of onnx.proto3
MODEL_GRAPH, MODEL_METADATA = 7, 14
GRAPH_INITIALIZER = 5
TENSOR_FLOAT_DATA, TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_LOCATION = 4, 8, 9, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1


class Malformed(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, varint value or (start, end) of the bytes) of each field of a message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, value
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            length = 8 if wire == 1 else 4
        else:
            raise Malformed(f"wire type {wire}")
        if pos + length > end:
            raise Malformed("field runs past the end")
        yield number, (pos, pos + length)
        pos += length


def _span(value: int | tuple[int, int]) -> tuple[int, int]:
    if not isinstance(value, tuple):
        raise Malformed("expected a length-delimited field")
    return value


def _entries(buf: mmap.mmap, span: tuple[int, int]) -> tuple[str, str]:
    try:
        parts = {n: bytes(buf[slice(*_span(v))]).decode("utf-8") for n, v in fields(buf, *span) if n in (1, 2)}
    except UnicodeDecodeError:
        raise Malformed("a metadata entry is not UTF-8 text") from None
    return parts.get(ENTRY_KEY, ""), parts.get(ENTRY_VALUE, "")


def read_metadata(path: Path) -> tuple[dict[str, str], mmap.mmap]:
    """The model's metadata entries, and the open memory map (for :func:`tensor_sha256`)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise Malformed("empty file")
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        metadata = dict(_entries(buf, _span(v)) for n, v in fields(buf, 0, len(buf)) if n == MODEL_METADATA)
    except Malformed:
        buf.close()
        raise
    return metadata, buf


def tensor_sha256(buf: mmap.mmap, name: str, folder: Path) -> str:
    """SHA-256 of the initializer ``name``'s data bytes, inside the file or in its external data file.

    Protobuf lets a later copy of a field win over an earlier one (and merges repeated messages), so a
    file could show a reader that takes the first copy other bytes than ONNX Runtime loads: any repeat of
    the graph, of the initializer or of one of its single fields is refused as malformed.
    """
    graphs = [graph for number, graph in fields(buf, 0, len(buf)) if number == MODEL_GRAPH]
    if len(graphs) != 1:
        raise Malformed(f"{len(graphs)} graphs")
    found: list[dict[int, list]] = []
    for field, tensor in fields(buf, *_span(graphs[0])):
        if field != GRAPH_INITIALIZER:
            continue
        parts: dict[int, list] = {}
        for n, v in fields(buf, *_span(tensor)):
            parts.setdefault(n, []).append(v)
        names = parts.get(TENSOR_NAME, [])
        if len(names) == 1 and bytes(buf[slice(*_span(names[0]))]).decode("utf-8", "replace") == name:
            found.append(parts)
    if not found:
        raise PatchCoreError(f"the graph has no initializer {name!r}")
    if len(found) > 1:
        raise Malformed(f"{len(found)} initializers named {name!r}")
    parts = found[0]
    single = (TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_LOCATION, TENSOR_FLOAT_DATA)
    if any(len(parts.get(n, [])) > 1 for n in single) or (TENSOR_RAW_DATA in parts and TENSOR_FLOAT_DATA in parts):
        raise Malformed(f"initializer {name!r} repeats a field")
    if parts.get(TENSOR_LOCATION, [0])[0] == EXTERNAL:
        return _external_sha256(dict(_entries(buf, _span(v)) for v in parts.get(TENSOR_EXTERNAL_DATA, [])), folder)
    data = parts.get(TENSOR_RAW_DATA) or parts.get(TENSOR_FLOAT_DATA) or [(0, 0)]
    return hashlib.sha256(buf[slice(*_span(data[0]))]).hexdigest()


def _external_sha256(entry: dict[str, str], folder: Path) -> str:
    location = Path(entry.get("location", ""))
    if not entry.get("location") or location.is_absolute() or ".." in location.parts:
        raise PatchCoreError(f"external data location {str(location)!r} must be a file name beside the model")
    try:
        offset = int(entry.get("offset", 0))
        length = int(entry["length"]) if "length" in entry else None
    except ValueError:
        raise Malformed("external data offset or length is not a number") from None
    digest = hashlib.sha256()
    try:
        with open(folder / location, "rb") as handle:
            handle.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                block = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
                if not block:
                    break
                digest.update(block)
                if remaining is not None:
                    remaining -= len(block)
    except OSError as exc:
        raise PatchCoreError(f"cannot read the external data file {folder / location} ({exc.strerror})") from None
    return digest.hexdigest()
