"""A Gaussian model of image-level feature vectors: mean, scale and a shrunk precision matrix, and the
Mahalanobis distance under it. Pure numpy.

Used for the image-level ("global") branch of a single-bank model (the Gaussian of each input's mean patch
feature) and of a multi-level model (of mean backbone features at a small size): a global texture change moves the mean
deep feature of the whole image, which a Gaussian of the good images' mean features sees even when no
single patch looks odd. With few images and many dimensions the sample covariance is singular, so it is
shrunk towards a multiple of the identity by the Ledoit-Wolf amount (Ledoit and Wolf, 2004), computed on
features standardised per dimension.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Gaussian(NamedTuple):
    """mean (D,), scale (D,) (per-dimension standard deviation), precision (D, D) of the standardised
    features, all float64; shrinkage in [0, 1]."""

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    shrinkage: float


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, D) centred rows -> ((D, D) shrunk covariance, shrinkage): (1 - a) S + a mu I, with the
    Ledoit-Wolf estimate of a (clipped to [0, 1])."""
    n, dim = x.shape
    sample = x.T @ x / n
    mu = float(np.trace(sample)) / dim
    target = mu * np.eye(dim)
    distance = float(((sample - target) ** 2).sum())
    # mean over rows of |x x^T - S|_F^2 = |x|^4 - 2 x^T S x + |S|_F^2, without forming the outer products
    norms = (x * x).sum(1)
    spread = float((norms**2 - 2 * np.einsum("ij,jk,ik->i", x, sample, x) + (sample**2).sum()).sum()) / n**2
    shrinkage = 1.0 if distance <= 0 else min(1.0, max(0.0, spread / distance))
    return (1 - shrinkage) * sample + shrinkage * target, shrinkage


def fit_gaussian(x: np.ndarray) -> Gaussian:
    """(N, D) feature rows (N >= 2) -> the Gaussian of :class:`Gaussian`."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_gaussian needs (N, D) rows with N >= 2, got shape {x.shape}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    covariance, shrinkage = ledoit_wolf((x - mean) / scale)
    return Gaussian(mean, scale, np.linalg.pinv(covariance, hermitian=True), shrinkage)


def mahalanobis(x: np.ndarray, gaussian: Gaussian) -> np.ndarray:
    """(N, D) rows -> (N,) Mahalanobis distances (the square root of the quadratic form) under ``gaussian``."""
    q = (np.asarray(x, dtype=np.float64) - gaussian.mean) / gaussian.scale
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", q, gaussian.precision, q), 0.0))


def matching_affine(target: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """(offset, slope) with ``offset + slope * source`` of the mean and standard deviation of ``target``.

    Both (N,) with N >= 2, scores of the same held-out good images: a single-bank model puts its global
    branch's Mahalanobis distances onto the bank's score scale with it, so that the two compare directly.

    >>> matching_affine(np.array([1.0, 3.0]), np.array([10.0, 20.0]))
    (-1.0, 0.2)
    """
    target, source = np.asarray(target, dtype=np.float64), np.asarray(source, dtype=np.float64)
    if target.shape != source.shape or target.ndim != 1 or target.shape[0] < 2:
        raise ValueError(f"matching_affine needs two (N,) score arrays with N >= 2, got {target.shape}, {source.shape}")
    spread = float(source.std())
    if not spread > 1e-12:
        raise ValueError("the source scores do not vary: no scale to match")
    slope = float(target.std()) / spread
    return float(target.mean() - slope * source.mean()), slope


def robust_affine(target: np.ndarray, source: np.ndarray, anchor: float = 25.0) -> tuple[float, float]:
    """(offset, slope) with ``offset + slope * source`` of the interquartile range of ``target``, and its
    ``anchor`` percentile (25: the quartiles coincide; 90: the upper tails meet where a maximum decides).

    Both 1-d with at least 2 values, scores of the same held-out good images (or their map pixels): how a
    single-bank model puts its global branch (anchor 25) and its coarse bank (anchor 90) onto the bank's score
    scale. Quartiles, not the mean and standard deviation: distances have long upper tails, and a few held-out
    images far out would otherwise set the scale (README, "Accuracy").

    >>> robust_affine(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([10.0, 20.0, 30.0, 40.0, 50.0]))
    (0.0, 0.1)
    """
    target, source = np.asarray(target, dtype=np.float64), np.asarray(source, dtype=np.float64)
    if target.ndim != 1 or source.ndim != 1 or min(target.shape[0], source.shape[0]) < 2:
        raise ValueError(f"robust_affine needs two 1-d score arrays of 2 or more, got {target.shape}, {source.shape}")
    if not 0 <= anchor <= 100:
        raise ValueError(f"anchor={anchor} must be a percentile in [0, 100]")
    (t25, t75, t_anchor), (s25, s75, s_anchor) = (
        np.percentile(target, [25, 75, anchor]),
        np.percentile(source, [25, 75, anchor]),
    )
    if not s75 - s25 > 1e-12 * max(1.0, abs(s25), abs(s75)):
        raise ValueError("the source scores' quartiles coincide: no scale to match")
    slope = float((t75 - t25) / (s75 - s25))
    return float(t_anchor - slope * s_anchor), slope
