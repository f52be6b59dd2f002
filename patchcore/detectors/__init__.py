"""Detectors: the written contract (``base.Detector``) and the detectors that satisfy it.

:func:`load` opens any model file as the detector it holds; :data:`KINDS` maps each model-file kind to
its class (the one place to register a new detector; its ``kind`` starts with "patchcore-").
"""

from __future__ import annotations

import os
from typing import Any

from .._version import __version__
from ..errors import PatchCoreError
from ..persistence import DetectorState, read_state, state_from_bytes
from .base import Detector, Inference, Prediction, Thresholds
from .ensemble import PatchCoreEnsemble
from .patchcore import PatchCore

KINDS: dict[str, type[Detector]] = {cls.kind: cls for cls in (PatchCore, PatchCoreEnsemble)}


def load(path: str | os.PathLike, **runtime: Any) -> Detector:
    """The detector in a model file, whichever kind it is (a PatchCore model or an ensemble).

    ``runtime``: device, batch_size, search, progress (and ``weights`` for a single model).
    """
    return from_state(read_state(path), source=path, **runtime)


def loads(data: bytes, *, source: str = "model bytes", verify_signature: bool = True, **runtime: Any) -> Detector:
    """The detector in the bytes of a model file (``detector.to_bytes()`` or a file's content), checked like
    :func:`load` (``verify_signature`` False: the checksum only, for bytes whose file was verified already)."""
    return from_state(state_from_bytes(data, source, verify_signature), source=source, **runtime)


def from_state(state: DetectorState, *, source: Any = "state", **runtime: Any) -> Detector:
    """The detector a state describes, whichever kind it is."""
    if state.kind not in KINDS:
        raise PatchCoreError(
            f"{source}: a {state.kind} file, which patchcore {__version__} cannot load: upgrade patchcore"
        )
    return KINDS[state.kind].from_state(state, source=source, **runtime)


__all__ = [
    "Detector",
    "Inference",
    "KINDS",
    "PatchCore",
    "PatchCoreEnsemble",
    "Prediction",
    "Thresholds",
    "from_state",
    "load",
    "loads",
]
