"""The torch-free preprocessing gives the torch path's pixels: resizes, crops, keep-aspect, maps back."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore.imaging import Geometry, geometry_for, map_to_original, preprocess, preprocess_array
from patchcore.imaging.resample import resize_antialiased, resize_bilinear, resize_nearest

SIZES = np.random.default_rng(0).integers(2, 90, (60, 4))


def torch_resize(array: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    x = torch.from_numpy(array)[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)[0, 0].numpy()


@pytest.mark.parametrize("sizes", SIZES.tolist())
def test_resizes_equal_torchs_kernels(sizes):
    h, w, out_h, out_w = sizes
    image = np.random.default_rng(int(h * w)).random((h, w), dtype=np.float32)
    # torch rounds the float32 interpolation weights in another order: a few 1e-6 apart
    np.testing.assert_allclose(
        resize_bilinear(image, (out_h, out_w)), torch_resize(image, (out_h, out_w), False), atol=5e-6
    )
    np.testing.assert_allclose(
        resize_antialiased(image, (out_h, out_w)), torch_resize(image, (out_h, out_w), True), atol=2e-5
    )


@pytest.mark.parametrize(
    "shape, resize, crop, keep_aspect",
    [((300, 200), 64, 56, False), ((37, 53), 64, None, False), ((120, 90), 48, None, True), ((90, 160), 48, 40, True)],
)
def test_preprocess_array_gives_the_tensor_path_pixels(shape, resize, crop, keep_aspect):
    image = np.random.default_rng(1).random((*shape, 3), dtype=np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x, geometry = preprocess(image, resize, crop, mean, std, keep_aspect=keep_aspect)
    y, same = preprocess_array(image, resize, crop, mean, std, keep_aspect=keep_aspect)
    assert same == geometry and y.dtype == np.float32 and y.shape == tuple(x.shape)
    np.testing.assert_allclose(y, x.numpy(), atol=1e-4)  # 2e-5 on [0, 1] pixels, divided by std


def test_maps_go_back_onto_the_original_like_torch():
    amap = np.random.default_rng(2).random((56, 56), dtype=np.float32)
    geometry = geometry_for((75, 130), 64, 56)
    canvas = torch.full((64, 64), float(amap.min()))
    canvas[4:60, 4:60] = torch.from_numpy(amap)
    expected = F.interpolate(canvas[None, None], size=(75, 130), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(map_to_original(amap, geometry), expected, atol=1e-6)
    assert map_to_original(amap, Geometry((56, 56), 56, 56)).tolist() == amap.tolist()


@pytest.mark.parametrize("sizes", SIZES[:20].tolist())
def test_nearest_resize_equals_torchs(sizes):
    h, w, out_h, out_w = sizes
    mask = np.random.default_rng(int(h + w)).random((h, w)) > 0.5
    expected = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(out_h, out_w))[0, 0]
    assert np.array_equal(resize_nearest(mask, (out_h, out_w)), expected.numpy() > 0.5)
