"""Detectors: the written contract (``base.Detector``) and the detectors that satisfy it.

:func:`load` opens any model file as the detector it holds; :data:`KINDS` maps each model-file kind to
its class (the one place to register a new detector; its ``kind`` starts with "patchcore-").
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import PatchCoreError
from ..persistence import DetectorState, read_state, state_from_bytes
from .base import Detector, Inference, Prediction, Scorer, Thresholds

if TYPE_CHECKING:
    from .ensemble import PatchCoreEnsemble
    from .multilevel import MultiLevelPatchCore
    from .patchcore import PatchCore

# The detectors themselves import torch: they load on first use, so that ``patchcore.detectors.base``
# (the contract, which the torch-free runtime implements) does not need torch.
_LAZY = {"PatchCore": ".patchcore", "PatchCoreEnsemble": ".ensemble", "MultiLevelPatchCore": ".multilevel"}


def __getattr__(name: str) -> Any:
    if name == "KINDS":
        return kinds()
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def kinds() -> dict[str, type[Detector]]:
    """KINDS: each model-file kind and its detector class (the one place to register a new detector)."""
    from .ensemble import PatchCoreEnsemble
    from .multilevel import MultiLevelPatchCore
    from .patchcore import PatchCore

    return {cls.kind: cls for cls in (PatchCore, PatchCoreEnsemble, MultiLevelPatchCore)}


def create(config: Any = None, **runtime: Any) -> Detector:
    """An unfitted detector for a :class:`~patchcore.config.PatchCoreConfig`: a :class:`PatchCore`, or a
    :class:`MultiLevelPatchCore` when the config asks for several banks or a global branch."""
    from ..config import PatchCoreConfig
    from .multilevel import MultiLevelPatchCore
    from .patchcore import PatchCore

    config = config or PatchCoreConfig()
    return MultiLevelPatchCore(config, **runtime) if config.multilevel else PatchCore(config, **runtime)


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
    known = kinds()
    if state.kind not in known:
        raise PatchCoreError(
            f"{source}: a {state.kind} file, which patchcore {__version__} cannot load: upgrade patchcore"
        )
    return known[state.kind].from_state(state, source=source, **runtime)


__all__ = [
    "Detector",
    "Inference",
    "KINDS",
    "MultiLevelPatchCore",
    "PatchCore",
    "PatchCoreEnsemble",
    "Prediction",
    "Scorer",
    "Thresholds",
    "create",
    "from_state",
    "kinds",
    "load",
    "loads",
]
