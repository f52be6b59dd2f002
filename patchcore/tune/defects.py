"""Synthetic defects on good images, for choosing settings without defect samples (``patchcore tune``).

Pure functions on (H, W, 3) uint8 arrays; each returns the defective image and its (H, W) boolean mask,
and takes an explicit ``np.random.Generator`` so that a seed gives the same defects everywhere. The kinds
imitate what inspection sets show (small foreign patches, smooth stains, thin cracks, colour and texture
changes over large regions or the whole image), in the spirit of CutPaste (Li et al., CVPR 2021) and
DRAEM's noise-shaped blends (Zavrtanik et al., ICCV 2021). No torch: numpy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

Defect = Callable[[np.ndarray, np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def smooth_noise(shape: tuple[int, int], scale: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 noise in [0, 1] with features about ``scale`` pixels wide (bicubically upsampled
    random grid: a cheap stand-in for Perlin noise)."""
    height, width = shape
    grid = rng.random((max(2, height // scale + 2), max(2, width // scale + 2))).astype(np.float32)
    big = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.asarray(big, dtype=np.float32)
    low, high = float(noise.min()), float(noise.max())
    return (noise - low) / (high - low + 1e-12)


def _box(shape: tuple[int, int], rng: np.random.Generator, low: float, high: float) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) box whose sides are ``low``-``high`` of the image's shorter side."""
    height, width = shape
    side = min(height, width)
    bh, bw = (max(2, int(side * rng.uniform(low, high))) for _ in range(2))
    bh, bw = min(bh, height - 1), min(bw, width - 1)
    return int(rng.integers(0, height - bh)), int(rng.integers(0, width - bw)), bh, bw


def cut_paste(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch (4-12% of the shorter side) of ``other`` (another good image), flipped or rotated, pasted at a
    random place: a small foreign piece of the same material."""
    out = image.copy()
    top, left, bh, bw = _box(image.shape[:2], rng, 0.04, 0.12)
    source = other if other.shape[:2] == image.shape[:2] else image
    st, sl = int(rng.integers(0, image.shape[0] - bh)), int(rng.integers(0, image.shape[1] - bw))
    patch = source[st : st + bh, sl : sl + bw]
    patch = patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
    patch = np.clip(patch.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    out[top : top + bh, left : left + bw] = patch
    mask = np.zeros(image.shape[:2], bool)
    mask[top : top + bh, left : left + bw] = True
    return out, mask


def noise_blend(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stain: a noise-shaped region (thresholded smooth noise, a few % of the image) where the image is blended
    with a shifted colour or with ``other``'s pixels."""
    height, width = image.shape[:2]
    noise = smooth_noise((height, width), max(4, min(height, width) // int(rng.integers(4, 9))), rng)
    mask = noise > np.quantile(noise, 1 - rng.uniform(0.01, 0.06))
    alpha = rng.uniform(0.5, 0.9)
    if rng.random() < 0.5 and other.shape == image.shape:
        fill = other.astype(np.float32)[::-1, ::-1]
    else:
        fill = image.astype(np.float32) + rng.uniform(-80, 80, 3).astype(np.float32)
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * fill[mask]
    return np.clip(out, 0, 255).astype(np.uint8), mask


def scratch(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin crack: a random polyline (1-3 px wide, a fifth to a half of the image long) darker or brighter
    than its surroundings."""
    height, width = image.shape[:2]
    length = min(height, width) * rng.uniform(0.2, 0.5)
    point = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    angle = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(4):
        angle += rng.normal(0, 0.4)
        point = point + length / 4 * np.array([np.cos(angle), np.sin(angle)])
        points.append(tuple(np.clip(point, 0, [width - 1, height - 1])))
    canvas = Image.new("L", (width, height))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(1, 4)))
    mask = np.asarray(canvas) > 0
    shade = 0.0 if rng.random() < 0.5 else 255.0
    out = image.astype(np.float32)
    out[mask] = 0.3 * out[mask] + 0.7 * shade
    return np.clip(out, 0, 255).astype(np.uint8), mask


def colour_change(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A discoloured region (a box of 15-40% of the shorter side, soft edges): brightness, contrast and a colour
    cast changed together."""
    height, width = image.shape[:2]
    top, left, bh, bw = _box((height, width), rng, 0.15, 0.4)
    mask = np.zeros((height, width), bool)
    mask[top : top + bh, left : left + bw] = True
    out = image.astype(np.float32)
    region = out[mask]
    mean = region.mean(0)
    gain, cast = rng.uniform(0.6, 1.4), rng.uniform(-30, 30, 3).astype(np.float32)
    out[mask] = (region - mean) * gain + mean + cast + rng.uniform(-25, 25)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def texture_change(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A global texture change, kept subtle (a global defect shows in the statistics of the whole image, not
    in one place): the whole image re-scaled (zoomed 1.1-1.3x, so the texture grows coarser), slightly
    blurred or slightly sharpened. The mask is the whole image (a global defect has no region)."""
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        zoom = rng.uniform(1.1, 1.3)
        ch, cw = max(2, int(height / zoom)), max(2, int(width / zoom))
        top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
        picture = picture.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.BICUBIC)
    else:
        from PIL import ImageFilter

        radius = rng.uniform(0.5, 1.0) * max(1.0, min(height, width) / 256)
        blurred = picture.filter(ImageFilter.GaussianBlur(radius))
        if kind == 1:
            picture = blurred
        else:  # unsharp: the image plus some of its detail again
            detail = image.astype(np.float32) - np.asarray(blurred, np.float32)
            picture = Image.fromarray(np.clip(image + rng.uniform(0.5, 1.0) * detail, 0, 255).astype(np.uint8))
    return np.asarray(picture.convert("RGB")), np.ones((height, width), bool)


#: every kind by name, in the order ``make_defects`` cycles through them
DEFECTS: dict[str, Defect] = {
    "cut-paste": cut_paste,
    "noise-blend": noise_blend,
    "scratch": scratch,
    "colour": colour_change,
    "texture": texture_change,
}


def make_defects(
    images: list[np.ndarray], seed: int, kinds: tuple[str, ...] = tuple(DEFECTS), count: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``count`` synthetic defects (default: one per image, and at least one of each kind) on ``images``
    ((H, W, 3) uint8 each), images and kinds taken in turn: [(defective image, (H, W) bool mask, kind)].
    ``other`` images for cut-paste and blends are the next image in the list, so every defect comes from the
    good images themselves."""
    unknown = sorted(set(kinds) - set(DEFECTS))
    if unknown or not kinds:
        raise ValueError(f"unknown defect kind(s) {unknown}: choose from {', '.join(DEFECTS)}")
    if not images:
        raise ValueError("make_defects needs at least one good image")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(max(len(images), len(kinds)) if count is None else count):
        image = images[i % len(images)]
        kind = kinds[i % len(kinds)]
        other = images[(i + 1) % len(images)]
        defective, mask = DEFECTS[kind](image, other, rng)
        out.append((defective, mask, kind))
    return out
