"""Export a fitted model to ONNX (or OpenVINO IR): one graph from the preprocessed input to image scores
and anomaly maps (:mod:`.graph`), the model's settings in the file's metadata (:func:`export_metadata`).

The torch-free runtime (:mod:`patchcore.runtime`) loads what this writes and prepares images exactly as
the model does. Exports are written atomically; banks whose bytes together exceed :data:`EXTERNAL_DATA_BYTES`
go to ``<file>.data`` beside the ``.onnx`` (protobuf files stop at 2 GB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._version import __version__
from ..detectors.base import Detector
from ..errors import PatchCoreError
from ..runtime import EXPORT_FORMAT, EXPORT_VERSION, METADATA_KEY

if TYPE_CHECKING:
    from ..detectors.patchcore import PatchCore

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
INPUT_NAME, OUTPUT_NAMES = "input", ("scores", "maps")
EXTERNAL_DATA_BYTES = 1 << 30  # banks above 1 GiB together are stored beside the graph
OPSET = 18
FOLD_ELEMENTS = 1024  # constants folded at export: below any memory bank's size


def bank_sha256(bank: np.ndarray) -> str:
    """SHA-256 of a bank's float32 little-endian bytes, row-major: what the ONNX initializer holds."""
    return hashlib.sha256(np.ascontiguousarray(bank, dtype="<f4").tobytes()).hexdigest()


def exportable(detector: Detector) -> PatchCore:
    """The PatchCore model inside ``detector``, or a one-line error saying what cannot be exported and why."""
    from ..detectors import PatchCore

    if not isinstance(detector, PatchCore):
        raise PatchCoreError(
            f"cannot export a {detector.kind} model: an ensemble's score standardises and combines its members "
            "in Python, outside one graph; export a single-backbone model (fit with one --backbone)"
        )
    if detector.config.tile_size is not None:
        raise PatchCoreError(
            "cannot export a tiling model (tile_size is set): tiles are cut from and stitched back onto each "
            "image outside the graph; refit without --tile-size, or score it with `patchcore predict MODEL`"
        )
    return detector


def export_metadata(
    model: PatchCore, bank_name: str, bank_digest: str, coarse: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The document stored under the ONNX metadata key ``patchcore``: everything the runtime needs
    (``bank_digest``: :func:`bank_sha256` of the bank, which the graph holds as ``bank_name``; ``coarse``: the
    coarse bank's initializer name and digest, for a model with one)."""
    cfg = model.config
    mean, std = model.normalization_
    rows, dim = model.memory_bank_.shape
    side = cfg.crop if cfg.crop is not None else cfg.resize
    varying = cfg.keep_aspect and cfg.crop is None  # each image keeps its own aspect: no fixed input shape
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "package_version": __version__,
        "kind": model.kind,
        "config": cfg.to_dict(),
        "thresholds": model.thresholds_.to_dict(),
        "score_scale": model.score_scale,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW float32, RGB in [0, 1] after resize and crop, then (x - mean) / std",
            "resize": cfg.resize,
            "crop": cfg.crop,
            "keep_aspect": cfg.keep_aspect,
            "shape": None if varying else [side, side],
            "mean": list(mean),
            "std": list(std),
        },
        "outputs": {"scores": "(N,) image scores", "maps": "(N, H, W) anomaly maps at the input size"},
        "bank": {
            "initializer": bank_name,
            "rows": int(rows),
            "dim": int(dim),
            "sha256": bank_digest,
        },
        "coarse_bank": None
        if coarse is None or model.coarse_ is None
        else {
            "initializer": coarse[0],
            "rows": int(model.coarse_.model.memory_bank_.shape[0]),
            "dim": int(model.coarse_.model.memory_bank_.shape[1]),
            "sha256": coarse[1],
        },
        "backbone": {
            "name": model.backbone_.name,
            "layers": list(model.backbone_.layers),
            "weights_sha256": model.backbone_.weights_sha256,
        },
        "n_train": model.n_train_,
        "source": dict(getattr(model, "provenance_", {})),
    }


def to_onnx(model: PatchCore) -> Any:
    """The ``onnx.ModelProto`` of a fitted PatchCore, its metadata set."""
    try:
        import onnx
        import onnxscript.optimizer
    except ImportError:
        raise PatchCoreError("export needs onnx and onnxscript: pip install 'patchcore[export]'") from None
    from .graph import PatchCoreGraph, graph_patches

    cfg = model.config
    bank = model.memory_bank_.detach().cpu()
    channels = [info.channels for info in model.backbone_.feature_info]
    side = cfg.crop if cfg.crop is not None else cfg.resize
    example = torch.zeros(2, 3, side, side)
    # on its own copy of the backbone (and the coarse bank's on its own)
    graph = PatchCoreGraph(model.backbone_, bank, cfg, channels, graph_patches(model), model.global_, model.coarse_)
    graph = graph.to("cpu").eval()
    batch = torch.export.Dim("batch", min=1)
    dims: dict[int, Any] = {0: batch}
    if cfg.keep_aspect and cfg.crop is None:  # every image keeps its own aspect: height and width vary
        dims |= {2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": dims},
            opset_version=OPSET,
            optimize=False,
            verbose=False,
        )
    # The optimiser folds constants of up to input_size_limit elements: a small bank would be copied into
    # folded transposes and slices, so only tensors far smaller than any bank are folded.
    if program is None:
        raise PatchCoreError("export failed: torch.onnx.export returned no program")
    program.model = onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_ELEMENTS)
    proto = program.model_proto
    name, digest = _bank_initializer(proto, bank.numpy(), "memory bank")
    coarse = None
    if model.coarse_ is not None:
        coarse = _bank_initializer(proto, model.coarse_.model.memory_bank_.detach().cpu().numpy(), "coarse bank")
    document = export_metadata(model, name, digest, coarse)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(document, sort_keys=True)})
    proto.producer_name, proto.producer_version = "patchcore", __version__
    return proto


def _initializer(proto: Any, name: str) -> Any:
    return next(t for t in proto.graph.initializer if t.name == name)


def _bank_initializer(proto: Any, bank: np.ndarray, what: str) -> tuple[str, str]:
    """(name, SHA-256) of the one initializer of ``proto`` that holds ``bank``'s values."""
    import onnx

    digest = bank_sha256(bank)
    names = [t.name for t in proto.graph.initializer if list(t.dims) == list(bank.shape)]
    found = [n for n in names if bank_sha256(onnx.numpy_helper.to_array(_initializer(proto, n))) == digest]
    if len(found) != 1:
        raise PatchCoreError(f"export failed: the graph holds {len(found)} copies of the {what}, expected 1")
    return found[0], digest


def export(detector: Detector, path: str | os.PathLike, fmt: str = "onnx") -> list[Path]:
    """Write ``detector`` as ONNX (``path``) or OpenVINO IR (``path`` with .xml and .bin); the files written.

    Every file appears whole or not at all: they are written into a temporary folder beside ``path``, then
    renamed into place (the external data or weights first, the graph last).
    """
    if fmt not in FORMATS:
        raise PatchCoreError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    model = exportable(detector)
    path = Path(path)
    if fmt == "openvino":
        try:
            import openvino
        except ImportError:
            raise PatchCoreError("--format openvino needs OpenVINO: pip install openvino") from None
    proto = to_onnx(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    try:
        onnx_file = staging / (path.name if fmt == "onnx" else path.stem + ".onnx")
        _save_onnx(proto, onnx_file)
        if fmt == "onnx":
            products = sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx")  # the graph last
        else:
            ov_model = openvino.convert_model(str(onnx_file))
            ov_model.set_rt_info(_metadata_of(proto), [METADATA_KEY])
            xml = staging / (path.stem + ".xml")
            openvino.save_model(ov_model, str(xml), compress_to_fp16=False)
            products = [staging / (path.stem + ".bin"), xml]
        written = []
        for product in products:
            target = path.parent / product.name
            os.replace(product, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _metadata_of(proto: Any) -> str:
    return next(p.value for p in proto.metadata_props if p.key == METADATA_KEY)


def _save_onnx(proto: Any, file: Path) -> None:
    import onnx

    document = json.loads(_metadata_of(proto))
    sizes = [bank["rows"] * bank["dim"] * 4 for bank in (document["bank"], document.get("coarse_bank")) if bank]
    if sum(sizes) > EXTERNAL_DATA_BYTES:  # together: both banks count against protobuf's 2 GiB
        from onnx.external_data_helper import convert_model_to_external_data

        # the banks (and any tensor as large as the smaller) beside the graph; the rest stays inside
        threshold = min(sizes)
        convert_model_to_external_data(
            proto, all_tensors_to_one_file=True, location=file.name + ".data", size_threshold=threshold
        )
    onnx.save_model(proto, str(file))
    for written in file.parent.iterdir():
        with open(written, "rb+") as handle:
            os.fsync(handle.fileno())
