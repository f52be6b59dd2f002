"""PatchCore industrial anomaly detection (Roth et al., CVPR 2022): fast on a CPU, offline by default.

The names below are imported on first use (PEP 562), so ``import patchcore.evaluation.metrics`` or
``import patchcore.config`` does not pull in torch and the detectors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "PatchCore": "patchcore.detectors.patchcore",
    "PatchCoreEnsemble": "patchcore.detectors.ensemble",
    "MultiLevelPatchCore": "patchcore.detectors.multilevel",
    "Detector": "patchcore.detectors.base",
    "Prediction": "patchcore.detectors.base",
    "Inference": "patchcore.detectors.base",
    "Thresholds": "patchcore.detectors.base",
    "load": "patchcore.detectors",
    "PatchCoreConfig": "patchcore.config",
    "PatchCoreError": "patchcore.errors",
    "NotFittedError": "patchcore.errors",
}

__all__ = [
    "Detector",
    "Inference",
    "NotFittedError",
    "PatchCore",
    "PatchCoreConfig",
    "PatchCoreEnsemble",
    "MultiLevelPatchCore",
    "PatchCoreError",
    "Prediction",
    "Thresholds",
    "__version__",
    "load",
]

if TYPE_CHECKING:
    from .config import PatchCoreConfig
    from .detectors import load
    from .detectors.base import Detector, Inference, Prediction, Thresholds
    from .detectors.ensemble import PatchCoreEnsemble
    from .detectors.multilevel import MultiLevelPatchCore
    from .detectors.patchcore import PatchCore
    from .errors import NotFittedError, PatchCoreError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'patchcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
