"""The torch-free runtime: score images with an exported model (``patchcore export``) on ONNX Runtime.

Needs numpy, Pillow and onnxruntime only (``pip install --no-deps patchcore`` plus those three; README,
"Export and deploy"). :class:`OnnxDetector` is a :class:`~patchcore.detectors.base.Scorer`: the same
``infer``, ``score_samples``, ``anomaly_maps``, ``predict`` and ``decide`` as the torch model, and images
are prepared by :func:`patchcore.imaging.geometry.preprocess_array`, which gives the pixels the torch
model's preprocessing gives. Loading checks the file's metadata and the SHA-256 of its memory bank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.thresholds import Thresholds, is_count, is_number
from ..detectors.base import Inference, Scorer
from ..errors import NotFittedError, PatchCoreError
from ..imaging.decode import DEFAULT_MAX_PIXELS, ImageLike, load_image
from ..imaging.geometry import Geometry, preprocess_array
from .onnx_file import Malformed, read_metadata, tensor_sha256

logger = logging.getLogger(__name__)

METADATA_KEY = "patchcore"
EXPORT_FORMAT = "patchcore-onnx"
EXPORT_VERSION = 1
# Input pixels per ONNX Runtime call (one image of 224 or 384 px, four of 128 px): the graph's intermediates
# grow with the run, and on a CPU a bigger run is hardly faster per image. Measured at batch 32 on textile:
# 384 px, runs of 2 images peaked at 378 MiB, of 1 at 231 MiB; 224 px (a 15,680-row bank), runs of 3 peaked
# at 603 MiB for 23.3 ms per image, runs of 1 at 255-259 MiB for 24.0-27.2 ms.
PIXELS_PER_RUN = 65_536


class OnnxDetector(Scorer):
    """An exported PatchCore model on ONNX Runtime (CPU). Use :meth:`load`.

    Attributes: ``metadata_`` (the export's metadata document), ``config_`` (the model's settings as a
    dict), ``thresholds_``, ``bank_sha256_`` (of the memory bank, checked at load).
    """

    def __init__(self, *, batch_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: str | os.PathLike, **runtime: Any) -> OnnxDetector:
        """Open an exported ``.onnx``; refuse files that are not patchcore exports or whose bank was altered."""
        path = Path(path)
        document = read_export(path, verify=True)
        model = cls(**runtime)
        model._open(path, document)
        return model

    def _open(self, path: Path, document: dict[str, Any]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PatchCoreError("an .onnx model needs ONNX Runtime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session_ = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own errors: a damaged graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PatchCoreError(f"{path}: ONNX Runtime cannot load it ({first}): export the model again") from None
        try:
            self.thresholds_ = Thresholds.from_dict(document.get("thresholds"))
        except PatchCoreError as exc:
            raise PatchCoreError(
                f"{path}: invalid thresholds in the metadata ({exc}): export the model again"
            ) from None
        self.metadata_ = document
        self.config_ = dict(document["config"])
        self.bank_sha256_ = document["bank"]["sha256"]
        self.n_train_ = int(document.get("n_train") or 0)
        self.fit_stats_: dict[str, Any] = {}
        self.score_scale = document.get("score_scale", "distance")
        self.source_ = str(path)

    def _check_fitted(self) -> None:
        if not hasattr(self, "session_"):
            raise NotFittedError("this OnnxDetector holds no model: use OnnxDetector.load(path)")

    def describe(self) -> dict[str, Any]:
        return dict(self.config_)

    @property
    def memory_bank_size(self) -> int:
        self._check_fitted()
        return int(self.metadata_["bank"]["rows"])

    def infer(self, images: Sequence[ImageLike], *, maps: bool = True) -> Iterator[Inference]:
        """Per image: (score, map at input resolution or None, geometry), lazily, in order."""
        self._check_fitted()
        spec = self.metadata_["input"]
        mean, std = tuple(spec["mean"]), tuple(spec["std"])
        crop = spec["crop"] if spec["keep_aspect"] else (spec["crop"] or spec["resize"])
        batch: list[tuple[np.ndarray, Geometry]] = []
        for image in images:
            array = load_image(image, self.max_pixels)
            x, geometry = preprocess_array(array, spec["resize"], crop, mean, std, keep_aspect=spec["keep_aspect"])
            # a run holds batch_size inputs of one shape, and never more than PIXELS_PER_RUN input pixels: the
            # graph's intermediates (and this process's memory) then stay small whatever the batch size
            limit = min(self.resolved_batch_size(), max(1, PIXELS_PER_RUN // (x.shape[1] * x.shape[2])))
            if batch and (len(batch) >= limit or x.shape != batch[0][0].shape):
                yield from self._run(batch, maps)
                batch = []
            batch.append((x, geometry))
        if batch:
            yield from self._run(batch, maps)

    def _run(self, batch: list[tuple[np.ndarray, Geometry]], maps: bool) -> Iterator[Inference]:
        scores, amaps = self.session_.run(None, {"input": np.stack([x for x, _ in batch])})
        for (_, geometry), score, amap in zip(batch, scores, amaps):
            yield Inference(float(score), amap if maps else None, geometry)


def read_export(path: Path, verify: bool = True) -> dict[str, Any]:
    """The metadata document of an exported ``.onnx`` (with ``verify``, its memory bank and coarse bank checked
    against the SHA-256 it records); a one-line PatchCoreError naming the file when it is not a sound export."""
    if path.is_dir():
        raise PatchCoreError(f"{path}: is a folder: pass the exported .onnx file")
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such model file")
    try:
        metadata, buffer = read_metadata(path)
    except (Malformed, UnicodeDecodeError) as exc:
        raise PatchCoreError(f"{path}: not an ONNX model ({exc}): pass a file written by `patchcore export`") from None
    try:
        document = _document(metadata)
        banks = [("memory bank", document["bank"])]
        if document.get("coarse_bank") is not None:
            banks.append(("coarse bank", document["coarse_bank"]))
        digests = [
            (what, bank, tensor_sha256(buffer, bank["initializer"], path.parent)) for what, bank in banks if verify
        ]
    except PatchCoreError as exc:
        raise PatchCoreError(f"{path}: {exc}") from None
    except (Malformed, KeyError, TypeError, ValueError) as exc:
        raise PatchCoreError(f"{path}: malformed export ({exc}): export the model again") from None
    finally:
        buffer.close()
    for what, bank, digest in digests:
        if digest != bank["sha256"]:
            raise PatchCoreError(
                f"{path}: the {what}'s SHA-256 ({str(digest)[:12]}) differs from the one recorded at export "
                f"({str(bank['sha256'])[:12]}): the file was altered or damaged; export the model again"
            )
    return document


def _document(metadata: dict[str, str]) -> dict[str, Any]:
    """The export's metadata document, checked: format, version and the fields the runtime reads."""
    if METADATA_KEY not in metadata:
        raise PatchCoreError("not exported by `patchcore export` (no patchcore metadata): export the model with it")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise PatchCoreError(f"the patchcore metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise PatchCoreError("the patchcore metadata is not an export's: export the model again")
    version = document.get("format_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise PatchCoreError(f"export format version {version!r} is newer than this runtime reads: upgrade patchcore")
    spec = document.get("input")
    if not isinstance(spec, dict) or not {"resize", "crop", "keep_aspect", "mean", "std"} <= set(spec):
        raise PatchCoreError("the patchcore metadata lacks the input geometry: export the model again")
    triple = lambda v: isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)
    if not (
        is_count(spec["resize"], 1)
        and (spec["crop"] is None or is_count(spec["crop"], 1))
        and isinstance(spec["keep_aspect"], bool)
        and triple(spec["mean"])
        and triple(spec["std"])
        and isinstance(document.get("config"), dict)
    ):
        raise PatchCoreError("the patchcore metadata's input geometry or config is malformed: export the model again")
    bank = document.get("bank")
    if not isinstance(bank, dict) or not {"initializer", "sha256", "rows"} <= set(bank):
        raise PatchCoreError("the patchcore metadata lacks the memory bank's hash: export the model again")
    coarse = document.get("coarse_bank")
    if coarse is not None and (not isinstance(coarse, dict) or not {"initializer", "sha256", "rows"} <= set(coarse)):
        raise PatchCoreError("the patchcore metadata's coarse bank lacks its hash: export the model again")
    return document


__all__ = ["OnnxDetector", "read_export"]
