"""Model files: tensors in safetensors, settings and provenance as JSON in its header. No pickle.

One file, so a write is atomic (temporary file in the same folder, fsync, rename) and a model can never
be half-written. The JSON carries the config, package and format versions, backbone name and weights
hash, training facts and a SHA-256 over the JSON and every tensor's bytes, so an edited or truncated
file is refused instead of silently scoring wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import PatchCoreConfig
from .errors import PatchCoreError

FORMAT_NAME = "patchcore-model"
ENSEMBLE_FORMAT_NAME = "patchcore-ensemble"
FORMAT_VERSION = 1
METADATA_KEY = "patchcore"


def checksum(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the canonical JSON header (without its checksum) and each tensor's name, shape and bytes."""
    digest = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != "checksum"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path``; on failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_record(model) -> dict[str, Any]:
    """What a fitted model's file says about it besides its bank: config, backbone, training, thresholds."""
    backbone = model.backbone_
    return {
        "config": model.config.to_dict(),
        "backbone": {
            "name": backbone.name,
            "layers": list(backbone.layers),
            "weights_sha256": backbone.weights_sha256,
        },
        "train": {
            "n_train": model.n_train_,
            "feature_shape": list(model.feature_shape_),
            "full_bank_size": model.fit_stats_.get("full_bank_size"),
            "seed": model.config.seed,
        },
        "thresholds": model.thresholds_,
    }


def write_model_file(path: str | os.PathLike, body: dict[str, Any], tensors: dict[str, torch.Tensor], kind: str = FORMAT_NAME) -> None:
    """Header (format, versions, ``body``, tensor list, checksum) + tensors, written atomically."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **body,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()},
    }
    header["checksum"] = checksum(header, tensors)
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_model(model, path: str | os.PathLike) -> None:
    write_model_file(path, model_record(model), {"memory_bank": model.memory_bank_})


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file, after checking that it is one (tensors are not read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such model file; create one with 'patchcore fit DATA -o {path}'")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise PatchCoreError(f"{path}: not a readable PatchCore model file ({exc}); refit or restore it") from exc
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PatchCoreError(f"{path}: a safetensors file, but not a PatchCore model (no valid header)") from exc
    if header.get("format") not in (FORMAT_NAME, ENSEMBLE_FORMAT_NAME):
        raise PatchCoreError(f"{path}: not a PatchCore model file (format {header.get('format')!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise PatchCoreError(
            f"{path}: model format version {version} is not supported by patchcore {__version__} "
            f"(it reads version {FORMAT_VERSION}); use the patchcore version that wrote it, or refit"
        )
    return header


def read_tensors(path: str | os.PathLike, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a model file, checked against the header's list and the checksum."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise PatchCoreError(f"{path}: the tensors cannot be read ({exc}); the file is damaged: refit or restore it") from exc
    expected = header.get("tensors", {})
    for name, spec in expected.items():
        if name not in tensors:
            raise PatchCoreError(f"{path}: tensor {name!r} is missing; the file is damaged: refit or restore it")
        if list(tensors[name].shape) != spec["shape"]:
            raise PatchCoreError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {spec['shape']}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PatchCoreError(f"{path}: unexpected tensor(s) {', '.join(extra)}; the file was altered: refit or restore it")
    if checksum(header, tensors) != header.get("checksum"):
        raise PatchCoreError(f"{path}: checksum mismatch, the file was edited or damaged: refit or restore it")
    return tensors


def load_model(path: str | os.PathLike, *, device: str = "cpu", weights: str | None = None, **runtime):
    """Rebuild a fitted :class:`PatchCore` from ``path``.

    ``weights`` points at the backbone weights when the file recorded in the model is elsewhere on this
    machine; the weights must hash to what the model was fitted with.
    """
    header = read_header(path)
    if header["format"] != FORMAT_NAME:
        raise PatchCoreError(f"{path}: an ensemble model; load it with patchcore.load(path) or PatchCoreEnsemble.load")
    tensors = read_tensors(path, header)
    model = restore_model(header, tensors["memory_bank"], path, device=device, weights=weights, **runtime)
    model.header_ = header
    return model


def load_any(path: str | os.PathLike, *, device: str = "cpu", **runtime):
    """A PatchCore model or an ensemble, whichever the file holds."""
    header = read_header(path)
    if header["format"] == ENSEMBLE_FORMAT_NAME:
        from .ensemble import PatchCoreEnsemble

        return PatchCoreEnsemble.load(path, device=device, **runtime)
    return load_model(path, device=device, **runtime)


def restore_model(record: dict[str, Any], bank: torch.Tensor, path, *, device: str = "cpu", weights: str | None = None, **runtime):
    """A fitted PatchCore from one :func:`model_record` and its bank, checking the backbone against it."""
    from .backbones import create_backbone
    from .model import PatchCore

    try:
        config = PatchCoreConfig.from_dict(record["config"])
    except (PatchCoreError, TypeError) as exc:
        raise PatchCoreError(f"{path}: invalid settings in the model file ({exc})") from exc
    if weights is not None:
        config = PatchCoreConfig.from_dict({**config.to_dict(), "weights": str(weights)})
    if bank.ndim != 2 or bank.dtype != torch.float32 or bank.shape[0] < 1:
        raise PatchCoreError(f"{path}: memory bank must be a non-empty (M, D) float32 tensor")

    model = PatchCore(config, device=device, **runtime)
    backbone = create_backbone(config.backbone, config.layers, config.weights).to(device)
    recorded = record["backbone"]
    if backbone.name != recorded["name"] or list(backbone.layers) != recorded["layers"]:
        raise PatchCoreError(f"{path}: backbone mismatch ({backbone.name} {backbone.layers} vs {recorded})")
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise PatchCoreError(
            f"{path}: the backbone weights here (sha256 {backbone.weights_sha256[:12]}) differ from those the model "
            f"was fitted with ({recorded['weights_sha256'][:12]}): pass the original weights file, or refit"
        )
    expected_dim = config.target_dim or sum(info.channels for info in backbone.feature_info)
    if bank.shape[1] != expected_dim:
        raise PatchCoreError(f"{path}: memory bank has {bank.shape[1]} dimensions, the backbone gives {expected_dim}")
    model.backbone_ = backbone
    model._set_bank(bank)
    model.n_train_ = int(record["train"]["n_train"])
    model.feature_shape_ = tuple(record["train"]["feature_shape"])
    model.fit_stats_ = {"full_bank_size": record["train"].get("full_bank_size")}
    model.thresholds_ = record.get("thresholds") or {"image": None, "pixel": None, "method": None}
    return model
