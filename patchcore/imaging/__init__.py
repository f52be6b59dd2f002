"""Images in and maps out: decoding (``decode``), the resize/crop/keep-aspect geometry and normalisation
(``geometry``) and tiling (``tiling``). Every path that feeds a model goes through these functions, so
preprocessing is defined once.
"""

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
from .geometry import Geometry, TiledGeometry, geometry_for, map_to_original, mask_to_input, mask_to_map, preprocess
from .tiling import stitch_maps, tile_coverage, tile_geometry, tile_inputs, tile_positions

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
    "mask_to_input",
    "mask_to_map",
    "preprocess",
    "stitch_maps",
    "tile_coverage",
    "tile_geometry",
    "tile_inputs",
    "tile_positions",
]
