"""Tiny synthetic images and data sets, made on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# the bank alone at the former default layers: what most tests check is the bank's mechanics (the global
# branch and the coarse bank have their own tests, and need more images than most of them fit on)
SMALL = {
    "resize": 64,
    "crop": 56,
    "coreset_ratio": 0.25,
    "seed": 0,
    "layers": ("blocks.2", "blocks.3"),
    "global_branch": False,
    "coarse_branch": False,
}


def texture(rng: np.random.Generator, size: int = 48, defect: bool = False) -> np.ndarray:
    """A striped, noisy 'fabric' (uint8 RGB); a defect is a bright square blob."""
    y, x = np.mgrid[:size, :size]
    base = 120 + 60 * np.sin(x / 2.0) + rng.normal(0, 8, (size, size))
    image = np.stack([base, base * 0.9, base * 0.8], axis=-1)
    if defect:
        r, c = rng.integers(8, size - 16, 2)
        image[r : r + 10, c : c + 10] = [255, 20, 20]
    return np.clip(image, 0, 255).astype(np.uint8)


def make_mvtec(
    root: Path, n_train: int = 5, n_good: int = 3, n_bad: int = 3, size: int = 48, masks: bool = True
) -> Path:
    """A tiny MVTec-layout category: train/good, test/good, test/blob, ground_truth/blob."""
    rng = np.random.default_rng(1)
    for i in range(n_train):
        _save(texture(rng, size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(texture(rng, size), root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image = texture(rng, size)
        r, c = rng.integers(4, size - 16, 2)
        image[r : r + 10, c : c + 10] = [255, 20, 20]
        _save(image, root / "test" / "blob" / f"{i:03d}.png")
        if masks:
            mask = np.zeros((size, size), np.uint8)
            mask[r : r + 10, c : c + 10] = 255
            _save(mask, root / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return root


def make_mvtec_realistic(root: Path, n_train: int = 8, n_good: int = 4, n_bad: int = 5, size: int = 48) -> Path:
    """A tiny MVTec-layout category whose defects look like real ones (a pasted patch, a stain, a scratch, a
    discoloured region, a texture change: :mod:`patchcore.tune.defects`), one type folder per kind, masks
    in ground_truth/<kind>/<name>_mask.png."""
    from patchcore.tune.defects import make_defects

    rng = np.random.default_rng(2)
    for i in range(n_train):
        _save(texture(rng, size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(texture(rng, size), root / "test" / "good" / f"{i:03d}.png")
    bases = [texture(rng, size) for _ in range(n_bad)]
    for i, (image, mask, kind) in enumerate(make_defects(bases, seed=5)):
        _save(image, root / "test" / kind / f"{i:03d}.png")
        _save(mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
