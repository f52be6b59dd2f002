"""Images in and maps out: decoding (``decode``), the resize/crop/keep-aspect geometry and normalisation
(``geometry``, numpy; ``tensors``, its torch side; ``resample``, torch's resize kernels without torch) and
tiling (``tiling``). Every path that feeds a model goes through these functions, so preprocessing is
defined once.

Names are exported lazily: ``decode``, ``geometry`` and ``resample`` import no torch, so the torch-free
runtime can use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "decode": (
        "DEFAULT_MAX_PIXELS",
        "IMAGE_SUFFIXES",
        "ImageLike",
        "describe",
        "list_images",
        "load_image",
        "read_image_bytes",
        "read_image_file",
        "read_mask_file",
    ),
    "geometry": (
        "Geometry",
        "TiledGeometry",
        "geometry_for",
        "map_to_original",
        "mask_to_input",
        "mask_to_map",
        "preprocess_array",
    ),
    "tensors": ("preprocess",),
    "tiling": ("stitch_maps", "tile_coverage", "tile_geometry", "tile_inputs", "tile_positions"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageLike",
    "describe",
    "list_images",
    "load_image",
    "read_image_bytes",
    "read_image_file",
    "read_mask_file",
    "Geometry",
    "TiledGeometry",
    "geometry_for",
    "map_to_original",
    "preprocess_array",
    "mask_to_input",
    "mask_to_map",
    "preprocess",
    "stitch_maps",
    "tile_coverage",
    "tile_geometry",
    "tile_inputs",
    "tile_positions",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


if TYPE_CHECKING:
    from .decode import (
        DEFAULT_MAX_PIXELS,
        IMAGE_SUFFIXES,
        ImageLike,
        describe,
        list_images,
        load_image,
        read_image_bytes,
        read_image_file,
        read_mask_file,
    )
    from .geometry import (
        Geometry,
        TiledGeometry,
        geometry_for,
        map_to_original,
        mask_to_input,
        mask_to_map,
        preprocess_array,
    )
    from .tensors import preprocess
    from .tiling import stitch_maps, tile_coverage, tile_geometry, tile_inputs, tile_positions
