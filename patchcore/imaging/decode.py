"""Decoding: read anything a user may hand us into float RGB, and find image files.

Accepted images: file paths, PIL images, numpy arrays ((H, W), (H, W, 1|3|4); uint8, uint16, bool or
float in [0, 1]) and torch tensors ((C, H, W) or (H, W); same dtypes). Gray and RGBA become RGB (alpha is
dropped: the part is what matters, not the background).
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PatchCoreError

if TYPE_CHECKING:
    import torch

# torch is not imported here (the torch-free runtime decodes with this module); a tensor can only exist
# when torch has been imported, so load_image looks for it in sys.modules.
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def describe(source: Any) -> str:
    """A short name for an image in messages: its path, or its type and shape."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    shape = getattr(source, "shape", None) or getattr(source, "size", "")
    return f"{type(source).__name__}{tuple(shape) if shape else ''}"


# Images larger than this many pixels are refused (a decompression bomb: a tiny file that claims a huge
# image); Pillow's own limit is the same, and a larger max_pixels lifts it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


def read_image_file(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file fully into an (H, W, 3) float32 RGB array in [0, 1], as a viewer shows it.

    The EXIF orientation is applied; 16-bit images are scaled by 65535, float images must hold values in
    [0, 1]; files of several frames (animations, multi-page TIFFs) and images of more than ``max_pixels``
    pixels (None: no limit) are refused with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise PatchCoreError(f"{path}: no such image file")
    return decode_image(path, str(path), max_pixels)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file's bytes exactly as :func:`read_image_file` decodes the file; ``name`` (e.g. an
    upload's file name) only labels error messages."""
    return decode_image(io.BytesIO(data), name, max_pixels)


def decode_image(source: Path | BinaryIO, label: str, max_pixels: int | None) -> np.ndarray:
    """The one decoder of image files (a path or an open binary stream); ``label`` names it in errors."""
    path = label
    pillow_limit = Image.MAX_IMAGE_PIXELS  # Pillow refuses images above twice this; restored below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says more
            if pillow_limit is not None and (max_pixels is None or max_pixels > 2 * pillow_limit):
                Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels // 2 + 1
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise PatchCoreError(
                        f"{path}: {width} x {height} pixels is more than the limit of {max_pixels:,} (a decompression "
                        "bomb, or a huge image): raise --max-pixels if it is genuine"
                    )
                frames = getattr(image, "n_frames", 1)
                if frames > 1 and image.format != "MPO":  # MPO: a phone JPEG with a preview, frame 0 is the photo
                    raise PatchCoreError(
                        f"{path}: holds {frames} frames (an animation or a multi-page file): save the frame to "
                        "score as an image of its own"
                    )
                image.load()  # decode now, so a truncated file fails here and not later
                return pil_to_array(ImageOps.exif_transpose(image) or image)
    except PatchCoreError as exc:
        message = str(exc)
        raise PatchCoreError(message if message.startswith(path) else f"{path}: {message}") from None
    except Image.DecompressionBombError as exc:
        raise PatchCoreError(f"{path}: {exc}; raise --max-pixels if the image is genuine") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        detail = str(exc) if isinstance(source, Path) else str(exc).replace(f" {source!r}", "")
        raise PatchCoreError(f"{path}: not a readable image ({detail}); replace or remove the file") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> (H, W, 3) float32 in [0, 1]: 16-bit modes scaled by 65535, float ("F") used as is."""
    if image.mode.startswith("I;16"):
        return to_rgb_float(np.asarray(image).astype(np.uint16))
    if image.mode == "I":  # 32-bit integers: what Pillow gives for some 16-bit files
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise PatchCoreError("32-bit integer images must hold values in [0, 65535] (16-bit): convert them first")
        return to_rgb_float(values.astype(np.uint16))
    if image.mode == "F":
        return to_rgb_float(np.asarray(image, dtype=np.float32))
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
            low, high = np.nanmin(array), np.nanmax(array)
            raise PatchCoreError(
                f"float images must hold finite values in [0, 1], this one holds [{low:g}, {high:g}]: scale it first"
            )
        return array.astype(np.float32)
    raise PatchCoreError(f"image arrays of dtype {array.dtype} are not supported: use uint8, uint16 or float in [0, 1]")


def load_image(source: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any accepted image -> (H, W, 3) float32 RGB in [0, 1] (files: see :func:`read_image_file`)."""
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source, max_pixels)
    if isinstance(source, Image.Image):
        return pil_to_array(source)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(source, torch.Tensor):
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
