"""The input geometry chosen from the training images themselves: their sizes and the spread of their aspects.

:func:`choose_geometry` is a pure function of the images' (height, width); :func:`image_sizes` reads them
from the files' headers (no decoding). The rule, and why:

* resize = 1.5 x the median shorter side, on a multiple of 32, within [224, 384]. On textile (250 px
  images with defects of a few pixels) upsampling to 384 px lifted local AUROC from 0.75 to 0.90 (README,
  "Choosing the defaults"); 384 is also where the default's time per image was measured, so larger images
  are shrunk to it rather than run slower; small images are not blown up beyond 1.5x (the backbone sees
  no new detail, only more patches to search).
* aspects that disagree (the 90th percentile of width / height over the 10th above 1.25) keep the square
  input: on the one such set measured (grey crops of 103-632 x 222-403 px, issue 12) ``--keep-aspect``
  scored lower (image AUROC 0.923 against 0.952) and ran 5x slower. The reason says so and names the flags
  that keep shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import GEOMETRY_FIELDS, PatchCoreConfig

logger = logging.getLogger(__name__)

MIN_RESIZE, MAX_RESIZE, UPSCALE, STEP = 224, 384, 1.5, 32
ASPECT_SPREAD = 1.25


def image_sizes(images: Sequence[Any], limit: int = 256) -> list[tuple[int, int]]:
    """(height, width) of up to ``limit`` images spread evenly over ``images`` (paths: from the file header,
    arrays: their shape). Unreadable files are skipped (fit reports them)."""
    from PIL import Image

    picked = list(images)
    if len(picked) > limit:
        picked = [picked[int(i)] for i in np.linspace(0, len(picked) - 1, limit)]
    sizes = []
    for image in picked:
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as handle:
                    width, height = handle.size
            except (OSError, ValueError):
                continue
        elif hasattr(image, "size") and isinstance(image.size, tuple):  # a PIL image
            width, height = image.size
        elif hasattr(image, "shape"):
            shape = tuple(image.shape)
            height, width = (shape[-2], shape[-1]) if len(shape) == 3 and shape[0] in (1, 3, 4) else shape[:2]
        else:
            continue
        sizes.append((int(height), int(width)))
    return sizes


def choose_geometry(sizes: Sequence[tuple[int, int]]) -> tuple[dict[str, Any], str]:
    """(height, width) of the training images -> (settings: resize, crop, keep_aspect; the reason, one line).

    >>> choose_geometry([(250, 250)] * 3)[0]
    {'resize': 384, 'crop': None, 'keep_aspect': False}
    """
    if not sizes:
        return {}, "no readable training image sizes: the fixed geometry is kept"
    heights = np.array([h for h, _ in sizes], dtype=np.float64)
    widths = np.array([w for _, w in sizes], dtype=np.float64)
    short = float(np.median(np.minimum(heights, widths)))
    resize = int(np.clip(STEP * round(UPSCALE * short / STEP), MIN_RESIZE, MAX_RESIZE))
    aspects = widths / heights
    low, high = np.quantile(aspects, [0.1, 0.9])
    spread = float(high / low)
    reason = (
        f"{len(sizes)} training images, median {np.median(heights):.0f} x {np.median(widths):.0f} px (H x W), "
        f"shorter side {short:.0f}: resize {resize} (1.5x, within {MIN_RESIZE}-{MAX_RESIZE}, a multiple of {STEP})"
    )
    if spread > ASPECT_SPREAD:
        reason += (
            f"; aspects vary (W/H {low:.2f}-{high:.2f}), square kept (keep-aspect measured worse and 5x slower on "
            "such a set); --keep-aspect or --tile-size keep shapes"
        )
    else:
        reason += f"; aspects agree (W/H {low:.2f}-{high:.2f}): square"
    return {"resize": resize, "crop": None, "keep_aspect": False}, reason


def adapt_geometry(config: PatchCoreConfig, images: Sequence[Any], given: Any = ()) -> PatchCoreConfig:
    """``config`` with the input geometry chosen from ``images`` (paths, arrays or PIL images) when
    ``auto_geometry`` is on and none of resize, crop, keep_aspect, tile_size is in ``given`` (the settings the
    user fixed: they win); the reason is stored in ``geometry_reason`` and logged."""
    if not config.auto_geometry or set(GEOMETRY_FIELDS) & set(given):
        return config
    changes, reason = choose_geometry(image_sizes(images))
    logger.info("input geometry: %s", reason)
    return config.replace(**changes, geometry_reason=reason)
