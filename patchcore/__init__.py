"""PatchCore industrial anomaly detection (Roth et al., CVPR 2022): fast on a CPU, offline by default."""

__version__ = "0.1.0"

from .config import PatchCoreConfig  # noqa: E402
from .errors import NotFittedError, PatchCoreError  # noqa: E402
from .model import PatchCore, Prediction  # noqa: E402
from .ensemble import PatchCoreEnsemble  # noqa: E402
from .serialization import load_any as load  # noqa: E402

__all__ = [
    "PatchCore", "PatchCoreConfig", "PatchCoreEnsemble", "PatchCoreError", "NotFittedError", "Prediction", "load", "__version__",
]
