"""Pictures of anomaly maps: heatmap overlays and binary masks, written atomically as PNG.

The pure functions (:func:`heatmap_overlay`, :func:`binary_mask`, :func:`overlay_range`, :func:`to_png_bytes`)
use numpy and PIL only; the colours come from a small built-in colormap (``_COLORMAP``), so matplotlib
is not needed here.

Colour scale: maps are normalised with a *fixed* range for a whole run, never per image, so the same
colour means the same anomaly score on every picture (a per-image range would paint the hottest spot of
a perfectly good image red). Patch scores are nearest-neighbour distances, which concentrate in a narrow
band well above 0 (on the textile set every pixel of every map lies within 0.6 to 1.25 x the pixel
threshold), so a range starting at 0 paints every picture the same green. :func:`overlay_range` therefore
centres the range on the pixel threshold t: ``(0.75 t, 1.25 t)``, so t is the middle of the scale (green),
normal texture is blue to cyan and only scores above t turn yellow to red (beyond 1.25 t: saturated red).
Without a pixel threshold it centres on the image threshold likewise (image scores are on the same
distance scale); without any threshold it is the minimum to the maximum map value over the run. Where a
pixel threshold exists, the outline of the region at or above it is drawn in white. Standardised maps
(ensembles: standard deviations of good pixels, of any sign) are centred on the pixel threshold t as
``(t - 2, t + 2)``; image thresholds are on another scale there and are not used.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.thresholds import Thresholds
from ..imaging.decode import load_image
from ..imaging.geometry import Geometry, TiledGeometry, map_to_original
from ..persistence import write_bytes
from .files import output_names, with_extension

logger = logging.getLogger(__name__)

# Anchor colours of a blue -> cyan -> green -> yellow -> red ramp (a "jet"-like scale with a darker start and
# end), interpolated linearly to 256 entries. Chosen for overlays: hot spots stand out against any texture.
_ANCHORS = np.array(
    [
        [0.00, 0.10, 0.05, 0.45],
        [0.20, 0.10, 0.35, 0.95],
        [0.40, 0.10, 0.80, 0.90],
        [0.55, 0.30, 0.85, 0.30],
        [0.70, 0.95, 0.90, 0.15],
        [0.85, 0.98, 0.50, 0.08],
        [1.00, 0.75, 0.02, 0.02],
    ]
)
_POSITIONS = np.linspace(0.0, 1.0, 256)
_COLORMAP = np.stack([np.interp(_POSITIONS, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=-1)
CONTOUR_COLOR = (255, 255, 255)
RANGE_HALF_WIDTH = 0.25  # colour range of distances: threshold x (1 -/+ this)
MAX_PICTURE_PIXELS = 4096 * 4096  # overlays and masks of larger images are drawn scaled down to this
STANDARDIZED_HALF_WIDTH = 2.0  # colour range of standardised maps: threshold -/+ this many standard deviations


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) float RGB in [0, 1]; values outside [vmin, vmax] are clipped."""
    values = np.asarray(values, dtype=np.float64)
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / span, 0.0, 1.0)
    return _COLORMAP[np.round(t * 255).astype(np.intp)]


def _shift_and(region: np.ndarray) -> np.ndarray:
    """One step of binary erosion with a 3 x 3 cross (pixels outside the image count as set)."""
    padded = np.pad(region, 1, mode="edge")
    return region & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def region_outline(region: np.ndarray, width: int = 1) -> np.ndarray:
    """The inner boundary (``width`` pixels thick) of a boolean region, (H, W) bool."""
    region = np.asarray(region, dtype=bool)
    inner = region
    for _ in range(max(1, int(width))):
        inner = _shift_and(inner)
    return region & ~inner


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    threshold: float | None = None,
) -> np.ndarray:
    """Blend a colour-coded anomaly map onto its image: (H, W, 3) uint8.

    ``image`` is (H, W, 3) float in [0, 1] (or uint8), ``amap`` (H, W) float at the same size; ``vmin``/
    ``vmax`` fix the colour scale (use one range for a whole run, see :func:`overlay_range`); ``alpha`` is
    the weight of the colours. With ``threshold``, the outline of ``amap >= threshold`` is drawn in white,
    about 1 px per 256 px of the shorter side.
    """
    image = np.asarray(image)
    amap = np.asarray(amap, dtype=np.float64)
    if image.dtype == np.uint8:
        image = image.astype(np.float64) / 255.0
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if amap.shape != image.shape[:2]:
        raise ValueError(f"anomaly map {amap.shape} and image {image.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * np.clip(image, 0.0, 1.0) + alpha * colorize(amap, vmin, vmax)
    out = np.round(blended * 255.0).astype(np.uint8)
    if threshold is not None:
        width = max(1, round(min(amap.shape) / 256))
        out[region_outline(amap >= threshold, width)] = CONTOUR_COLOR
    return out


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels at or above ``threshold``: (H, W) uint8, 255 = anomalous, 0 = normal."""
    return np.where(np.asarray(amap) >= threshold, 255, 0).astype(np.uint8)


def overlay_range(
    pixel_threshold: float | None,
    image_threshold: float | None = None,
    run_max: float | None = None,
    run_min: float | None = None,
    scale: str = "distance",
) -> tuple[float, float] | None:
    """The fixed colour range (vmin, vmax) for a run; None when it needs the run's values and none are given.

    Distances (``scale="distance"``): ``(0.75 t, 1.25 t)`` for t = the pixel threshold, else the image
    threshold. Standardised maps (``scale="standardized"``): ``(t - 2, t + 2)`` for t = the pixel threshold.
    Otherwise ``(run_min, run_max)`` (``run_min`` defaults to 0).

    >>> overlay_range(2.0), overlay_range(None, None, 5.0, 1.0), overlay_range(-0.5, scale="standardized")
    ((1.5, 2.5), (1.0, 5.0), (-2.5, 1.5))
    """
    if scale == "standardized":
        if pixel_threshold is not None:
            t = float(pixel_threshold)
            return t - STANDARDIZED_HALF_WIDTH, t + STANDARDIZED_HALF_WIDTH
    else:
        for reference in (pixel_threshold, image_threshold):
            if reference is not None and reference > 0:
                return (1.0 - RANGE_HALF_WIDTH) * float(reference), (1.0 + RANGE_HALF_WIDTH) * float(reference)
    if run_max is None:
        return None
    low = 0.0 if run_min is None else float(run_min)
    high = float(run_max)
    return (low, high) if high > low else (low, low + 1.0)


def to_png_bytes(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 array -> PNG file bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def thumbnail(array: np.ndarray, max_side: int = 256) -> np.ndarray:
    """Shrink a uint8 image so its longer side is at most ``max_side`` (never enlarges)."""
    image = Image.fromarray(np.asarray(array))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a PNG atomically (a reader never sees half a file)."""
    write_bytes(path, to_png_bytes(array))


def to_uint8(pixels: np.ndarray, rows: int = 512) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8, a band of rows at a time (no full-size float temporaries)."""
    out = np.empty(pixels.shape, np.uint8)
    for top in range(0, pixels.shape[0], rows):
        out[top : top + rows] = np.round(pixels[top : top + rows] * 255.0)
    return out


def render_overlay(
    image: Any,
    input_map: np.ndarray,
    geometry: Geometry | TiledGeometry,
    vrange: tuple[float, float],
    threshold: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image (path or array) and its map at input resolution -> (image (H, W, 3) float, map on the
    image (H, W), heatmap overlay (H, W, 3) uint8), the one drawing of every overlay, mask and report.

    Pictures are drawn at the original size, or for images of more than :data:`MAX_PICTURE_PIXELS` pixels
    scaled down to that many (so a huge image costs bounded memory).
    """
    pixels = load_image(image, max_pixels=None)  # already accepted when it was scored
    height, width = pixels.shape[:2]
    scale = min(1.0, (MAX_PICTURE_PIXELS / (height * width)) ** 0.5)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = Image.fromarray(to_uint8(pixels)).resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(small, dtype=np.float32) / 255.0
        geometry = dataclasses.replace(geometry, original=(size[1], size[0]))
    full = map_to_original(np.asarray(input_map, dtype=np.float32), geometry)
    overlay = heatmap_overlay(pixels, full, vmin=vrange[0], vmax=vrange[1], threshold=threshold)
    return pixels, full, overlay


class RunRange:
    """The colour range of a run: from the detector's thresholds, else the smallest to the largest map value
    seen. ``scale`` is the detector's ``score_scale`` ("distance" or "standardized")."""

    def __init__(self, thresholds: Thresholds | None = None, scale: str = "distance") -> None:
        self.pixel_threshold = thresholds.pixel if thresholds is not None else None
        self.image_threshold = thresholds.image if thresholds is not None else None
        self.scale = scale
        self.low = np.inf
        self.high = -np.inf

    def see(self, amap: np.ndarray) -> None:
        self.low = min(self.low, float(np.min(amap)))
        self.high = max(self.high, float(np.max(amap)))

    @property
    def fixed(self) -> tuple[float, float] | None:
        """The range known before any map: from the thresholds (None without thresholds)."""
        return overlay_range(self.pixel_threshold, self.image_threshold, scale=self.scale)

    def range(self) -> tuple[float, float]:
        """The run's range: from the thresholds, else the smallest to the largest value seen (call after
        :meth:`see` has seen the maps)."""
        fixed = self.fixed
        return fixed if fixed is not None else (self.low, self.high if self.high > self.low else self.low + 1.0)


class OverlayWriter:
    """Writes ``OUT/overlays/<relative>.png`` and ``OUT/masks/<relative>.png`` for a run of images.

    ``add`` takes an image's map at the model's input resolution and its geometry; both pictures are drawn
    at the image's original size. With a threshold, the colour range is fixed up front and pictures are
    written at once; without any threshold the range is the run's minimum to maximum, so the maps are kept
    (float16, input resolution: about 0.3 MB per image at 384 px) and written by :meth:`finish`.
    Masks need the pixel threshold; without one they are skipped with one warning.
    """

    def __init__(self, out: str | os.PathLike, thresholds: Thresholds | None, scale: str = "distance") -> None:
        self.out = Path(out)
        self.range = RunRange(thresholds, scale)
        self.pixel_threshold = self.range.pixel_threshold
        self.pending: list[tuple[Any, Path, np.ndarray, Any]] = []
        self.written = 0
        if self.pixel_threshold is None:
            logger.warning(
                "the model has no pixel threshold: writing heatmap overlays but no binary masks "
                "(fit with --threshold-fpr or --pixel-threshold to get OUT/masks/)"
            )

    def add(self, image: Any, name: str | os.PathLike, amap: np.ndarray, geometry: Any, *, path: Any = None) -> None:
        """``image``: a path or (H, W, 3) array; ``name``: the picture's name under overlays/ and masks/ without
        ".png" (see :func:`patchcore.reporting.files.output_names`); ``path``: the image's file, kept instead of its
        pixels when the writing has to wait for the run's end."""
        relative = with_extension(Path(name), ".png")
        self.range.see(amap)
        if self.range.fixed is None:
            source = path if path is not None else image
            if not isinstance(source, (str, os.PathLike)):
                source = np.asarray(source)
            self.pending.append((source, relative, np.asarray(amap, dtype=np.float16), geometry))
            return
        self._write(image, relative, amap, geometry)

    def finish(self) -> None:
        for image, relative, amap, geometry in self.pending:
            self._write(image, relative, amap, geometry)
        self.pending.clear()

    def _write(self, image: Any, relative: Path, amap: np.ndarray, geometry: Any) -> None:
        overlay, mask = render_pictures(image, amap, geometry, self.range.range(), self.pixel_threshold)
        self.put(relative, overlay, mask)

    def put(self, relative: Path, overlay: bytes, mask: bytes | None) -> None:
        """Write pictures drawn elsewhere (:func:`render_pictures`, e.g. on a worker): ``relative`` is the
        picture's path under overlays/ and masks/, ".png" included."""
        write_bytes(self.out / "overlays" / relative, overlay)
        if mask is not None:
            write_bytes(self.out / "masks" / relative, mask)
        self.written += 1


def render_pictures(
    image: Any, input_map: np.ndarray, geometry: Any, vrange: tuple[float, float], pixel_threshold: float | None
) -> tuple[bytes, bytes | None]:
    """The PNG bytes of an image's heatmap overlay and, with a pixel threshold, of its binary mask (see
    :func:`render_overlay`): what :class:`OverlayWriter` writes."""
    _, full, overlay = render_overlay(image, input_map, geometry, vrange, pixel_threshold)
    mask = None if pixel_threshold is None else to_png_bytes(binary_mask(full, pixel_threshold))
    return to_png_bytes(overlay), mask


def sample_names(samples: Any) -> list[Path]:
    """Output names of test samples: ``<defect type>/<file name without extension>``, made distinct by
    :func:`patchcore.reporting.files.output_names`."""
    return output_names([Path(str(sample.defect_type)) / Path(sample.path).name for sample in samples])
