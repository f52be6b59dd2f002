"""Model files: a detector's state as one safetensors file. No pickle.

Tensors are stored as safetensors; everything else (settings, provenance, training facts, thresholds) is a
JSON document in the file's header, beside the format name and version, the package version, the time
of writing, the list of tensors and a SHA-256 over the JSON and every tensor's bytes, so an edited or
truncated file is refused instead of silently scoring wrong. One file, written atomically (temporary file
in the same folder, fsync, rename): a model is never half-written.

This module knows the format and its versions, not the detectors: it turns a :class:`DetectorState`
into a file and back. To add a format version, raise :data:`FORMAT_VERSION` and add the step from the
previous version to :data:`MIGRATIONS`; files of every older version keep loading through the chain.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import PatchCoreError
from .atomic import atomic_write

# Every detector kind is stored under a format name with this prefix; which kinds exist is the detectors'
# business (``patchcore.detectors.KINDS``). The two below are named here for the migrations.
KIND_PREFIX = "patchcore-"
SINGLE_KIND = "patchcore-model"
ENSEMBLE_KIND = "patchcore-ensemble"
FORMAT_VERSION = 2
METADATA_KEY = "patchcore"
ENVELOPE = ("format", "format_version", "package_version", "created", "tensors", "checksum", "signature")
# With a key in this variable, models are signed when written (HMAC-SHA256 of the checksum) and refused when
# read unless their signature matches: the checksum alone catches damage, the signature catches forgery.
KEY_VARIABLE = "PATCHCORE_MODEL_KEY"


@dataclass(frozen=True)
class DetectorState:
    """Everything a fitted detector is, as data: ``kind`` (the file's format name), ``meta`` (a JSON-able
    dict: settings, training facts, thresholds) and ``tensors`` (name -> numpy array).

    ``provenance`` is filled when a state is read from a file (format and package version, time of
    writing); it is ignored when one is written.
    """

    kind: str
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- versions
def _v1_to_v2(kind: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named the mean of the top-k patch scores "paper" whenever image_top_k > 1; version 2 calls
    that "mean-top-k" and keeps "paper" for the paper's max. "official" keeps its top-k as stored. Files
    from before image_top_k existed hold none: they were scored with the max (top-k 1)."""
    configs = [meta["config"]] if kind == SINGLE_KIND else [member["config"] for member in meta["members"]]
    for config in configs:
        config.setdefault("image_top_k", 1)
        if config.get("scoring") == "paper" and config["image_top_k"] != 1:
            config["scoring"] = "mean-top-k"
    return meta


# version N -> the step that turns a version-N document into version N + 1
MIGRATIONS: dict[int, Callable[[str, dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(kind: str, meta: dict[str, Any], version: int, source: Any = "header") -> dict[str, Any]:
    """A ``version`` document brought to :data:`FORMAT_VERSION`, one step at a time."""
    meta = json.loads(json.dumps(meta))  # a deep copy: the caller's header stays as read
    try:
        for step in range(version, FORMAT_VERSION):
            meta = MIGRATIONS[step](kind, meta)
    except (KeyError, TypeError, AttributeError) as exc:
        raise PatchCoreError(
            f"{source}: a format-{version} header that cannot be read ({exc!r}); refit or restore the model"
        ) from exc
    return meta


# ---------------------------------------------------------------------------------------------- checksum
def checksum(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the canonical JSON header (without its checksum) and each tensor's name, dtype, shape
    and bytes (dtype spelled as torch does, ``torch.float32``, as in every file written so far)."""
    digest = hashlib.sha256()
    body = {k: v for k, v in header.items() if k not in ("checksum", "signature")}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:torch.{array.dtype.name}:{tuple(array.shape)}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def signing_key() -> bytes | None:
    """The site's model-signing key from :data:`KEY_VARIABLE` (None when unset or empty)."""
    key = os.environ.get(KEY_VARIABLE)
    return key.encode() if key else None


def signature(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a model's checksum under ``key``, hex."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------- writing
def check_model_target(path: str | os.PathLike, recognise: Callable[[Path], object] | None = None) -> None:
    """Refuse to write a model over anything but a PatchCore model file: a folder, a symbolic link, a FIFO
    or device, or a file that is not a model (a mistyped -o must never destroy data).

    ``recognise(path)`` raises PatchCoreError unless an existing file may be replaced (default: it must be
    a model file this version reads; exports pass their own check).
    """
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PatchCoreError(f"{path}: {parent} is a file, not a folder: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PatchCoreError(f"{path}: cannot write into {parent} (permission denied): choose another path")
    if path.is_symlink():
        raise PatchCoreError(
            f"{path}: is a symbolic link: name the file itself ({os.path.realpath(path)}) or another path"
        )
    if not path.exists():
        return
    if path.is_dir():
        raise PatchCoreError(f"{path}: is a folder: name a model file, e.g. {path / 'model.safetensors'}")
    if not path.is_file():
        raise PatchCoreError(f"{path}: is not a regular file (a FIFO or a device): name a model file")
    try:
        (recognise or read_header)(path)
    except PatchCoreError:
        raise PatchCoreError(
            f"{path}: exists and is not a PatchCore model this version can read, so it is not overwritten: "
            "remove it or choose another name"
        ) from None


def write_state(path: str | os.PathLike, state: DetectorState) -> None:
    """Write ``state`` to ``path`` atomically, as the current format version (see :func:`check_model_target`)."""
    from safetensors.numpy import save_file

    check_model_target(path)
    tensors, metadata = _encode(state)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def state_to_bytes(state: DetectorState) -> bytes:
    """``state`` as the bytes of a model file (what :func:`write_state` writes), e.g. to send it to workers."""
    from safetensors.numpy import save

    tensors, metadata = _encode(state)
    return save(tensors, metadata=metadata)


def _encode(state: DetectorState) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the safetensors metadata (the JSON header) of a model file holding ``state``."""
    if not state.kind.startswith(KIND_PREFIX):
        raise ValueError(f"detector kind {state.kind!r} must start with {KIND_PREFIX!r}")
    clash = sorted(set(state.meta) & set(ENVELOPE))
    if clash:
        raise ValueError(f"state meta must not use the envelope keys {', '.join(clash)}")
    tensors = {name: np.ascontiguousarray(array) for name, array in state.tensors.items()}
    header = {
        "format": state.kind,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **state.meta,
        "tensors": {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in tensors.items()},
    }
    header["checksum"] = checksum(header, tensors)
    key = signing_key()
    if key is not None:
        header["signature"] = signature(key, header["checksum"])
    return tensors, {METADATA_KEY: json.dumps(header, sort_keys=True)}


# ---------------------------------------------------------------------------------------------- reading
def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file as stored, after checking that it is one (tensors are not read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such model file; create one with 'patchcore fit DATA -o {path}'")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise PatchCoreError(f"{path}: not a readable PatchCore model file ({exc}); refit or restore it") from exc
    return _check_header(metadata, path)


def _check_header(metadata: Mapping[str, str], path: Any) -> dict[str, Any]:
    """The PatchCore header in a safetensors file's metadata, checked (``path`` names it in errors)."""
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PatchCoreError(f"{path}: a safetensors file, but not a PatchCore model (no valid header)") from exc
    if not isinstance(header, dict):
        raise PatchCoreError(f"{path}: a safetensors file, but not a PatchCore model (its header is not a JSON object)")
    kind = header.get("format")
    if not isinstance(kind, str) or not kind.startswith(KIND_PREFIX):
        raise PatchCoreError(f"{path}: not a PatchCore model file (format {kind!r})")
    for key in ("package_version", "created", "checksum"):
        if not isinstance(header.get(key), str):
            raise PatchCoreError(
                f"{path}: the header's {key} is missing or not text; the file was altered: refit or restore it"
            )
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PatchCoreError(
            f"{path}: model format version {version} is not supported by patchcore {__version__} "
            f"(it reads versions 1 to {FORMAT_VERSION}); use the patchcore version that wrote it, or refit"
        )
    return header


def read_tensors(
    path: str | os.PathLike, header: Mapping[str, Any], verify_signature: bool = True
) -> dict[str, np.ndarray]:
    """The tensors of a model file, checked against the header's list, the checksum and (with a key set and
    ``verify_signature``) the signature."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise PatchCoreError(
            f"{path}: the tensors cannot be read ({exc}); the file is damaged: refit or restore it"
        ) from exc
    return _check_tensors(tensors, header, path, verify_signature)


def _check_tensors(
    tensors: dict[str, np.ndarray], header: Mapping[str, Any], path: Any, verify_signature: bool
) -> dict[str, np.ndarray]:
    expected = header.get("tensors")
    if not isinstance(expected, dict):
        raise PatchCoreError(f"{path}: the header lists no tensors; the file was altered: refit or restore it")
    for name, spec in expected.items():
        if name not in tensors:
            raise PatchCoreError(f"{path}: tensor {name!r} is missing; the file is damaged: refit or restore it")
        if not isinstance(spec, dict) or list(tensors[name].shape) != spec.get("shape"):
            raise PatchCoreError(
                f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, not what the header says"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PatchCoreError(
            f"{path}: unexpected tensor(s) {', '.join(extra)}; the file was altered: refit or restore it"
        )
    if checksum(header, tensors) != header.get("checksum"):
        raise PatchCoreError(f"{path}: checksum mismatch, the file was edited or damaged: refit or restore it")
    key = signing_key()
    if key is not None and verify_signature:
        if "signature" not in header:
            raise PatchCoreError(f"{path}: unsigned model, and {KEY_VARIABLE} is set: sign it with 'patchcore sign'")
        if not hmac.compare_digest(str(header["signature"]), signature(key, str(header["checksum"]))):
            raise PatchCoreError(f"{path}: the signature does not match {KEY_VARIABLE}: a forged or foreign model")
    return tensors


def read_state(path: str | os.PathLike, verify_signature: bool = True) -> DetectorState:
    """The verified state in a model file, migrated to the current format version (``verify_signature``
    False: the checksum is verified, the signature not; for signing)."""
    header = read_header(path)
    return _state(header, read_tensors(path, header, verify_signature), path)


def state_from_bytes(data: bytes, source: Any = "model bytes", verify_signature: bool = True) -> DetectorState:
    """The verified state in the bytes of a model file (:func:`state_to_bytes`, or a file's content), checked
    like :func:`read_state`; ``source`` names the bytes in errors."""
    from safetensors.numpy import load

    try:
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:
        raise PatchCoreError(f"{source}: not a readable PatchCore model ({exc}); refit or restore it") from exc
    header = _check_header(metadata, source)
    return _state(header, _check_tensors(tensors, header, source, verify_signature), source)


def _state(header: dict[str, Any], tensors: dict[str, np.ndarray], source: Any) -> DetectorState:
    kind, version = header["format"], header["format_version"]
    meta = migrate(kind, {k: v for k, v in header.items() if k not in ENVELOPE}, version, source)
    provenance = {k: header.get(k) for k in ("format_version", "package_version", "created")}
    return DetectorState(kind, meta, tensors, provenance)


def read_document(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a verified model file as this version reads it (what ``patchcore info`` prints): the
    envelope as stored, the settings migrated, and ``read_as_format_version`` when they were."""
    header = read_header(path)
    read_tensors(path, header)  # verified like a load: an edited file is refused here too
    version = header["format_version"]
    meta = migrate(header["format"], {k: v for k, v in header.items() if k not in ENVELOPE}, version, path)
    document = {**{k: header[k] for k in ENVELOPE if k in header}, **meta}
    if version != FORMAT_VERSION:
        document["read_as_format_version"] = FORMAT_VERSION
    return document
