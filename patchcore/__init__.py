"""PatchCore industrial anomaly detection (Roth et al., CVPR 2022)."""

__version__ = "0.1.0"
