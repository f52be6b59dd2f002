"""Decoding: read anything a user may hand us into float RGB, and find image files.

Accepted images: file paths, PIL images, numpy arrays ((H, W), (H, W, 1|3|4); uint8, uint16, bool or
float in [0, 1]) and torch tensors ((C, H, W) or (H, W); same dtypes). Gray and RGBA become RGB (alpha is
dropped: the part is what matters, not the background).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import PatchCoreError

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def describe(source: Any) -> str:
    """A short name for an image in messages: its path, or its type and shape."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    shape = getattr(source, "shape", None) or getattr(source, "size", "")
    return f"{type(source).__name__}{tuple(shape) if shape else ''}"


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file fully into an (H, W, 3) float32 RGB array in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return pil_to_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PatchCoreError(f"{path}: not a readable image ({exc}); replace or remove the file") from exc


def pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb_float(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def to_rgb_float(array: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16/bool/float array -> (H, W, 3) float32 in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise PatchCoreError(f"image array of shape {array.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    array = array[..., :3]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise PatchCoreError(f"image array of shape {array.shape} is empty")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype in (np.int32, np.int64) and array.min() >= 0 and array.max() <= 65535:
        # PIL's "I" mode holds 16-bit PNGs as int32.
        return array.astype(np.float32) / (65535.0 if array.max() > 255 else 255.0)
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise PatchCoreError("float images must hold finite values in [0, 1]; scale them first")
        return array.astype(np.float32)
    raise PatchCoreError(f"image arrays of dtype {array.dtype} are not supported: use uint8, uint16 or float in [0, 1]")


def load_image(source: ImageLike) -> np.ndarray:
    """Any accepted image -> (H, W, 3) float32 RGB in [0, 1]."""
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source)
    if isinstance(source, Image.Image):
        return pil_to_array(source)
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        return to_rgb_float(tensor.numpy())
    if isinstance(source, np.ndarray):
        return to_rgb_float(source)
    raise PatchCoreError(f"cannot read an image from {type(source).__name__}: pass a path, PIL image, array or tensor")


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """A ground-truth mask file -> (H, W) bool (any non-zero pixel is defective)."""
    image = read_image_file(path)
    return image.max(axis=-1) > 0


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path; hidden files skipped."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
