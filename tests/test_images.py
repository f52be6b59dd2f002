import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.errors import PatchCoreError
from patchcore.imaging import Geometry, load_image, map_to_original, mask_to_input, preprocess


def test_every_input_kind_gives_the_same_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    expected = rgb.astype(np.float32) / 255
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 7, np.uint8)], axis=-1)
    for source in (
        path,
        str(path),
        Image.fromarray(rgb),
        rgb,
        rgba,
        (rgb.astype(np.uint16) * 257),
        torch.from_numpy(rgb).permute(2, 0, 1),
        torch.from_numpy(expected).permute(2, 0, 1),
    ):
        np.testing.assert_allclose(load_image(source), expected, atol=1e-6, err_msg=type(source).__name__)


def test_gray_and_16_bit_files_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(gray)
    assert out.shape == (3, 4, 3) and np.allclose(out[..., 0], out[..., 2])
    deep = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(load_image(tmp_path / "deep.png")[..., 1], deep / 65535, atol=1e-6)
    assert load_image(gray[..., None]).shape == (3, 4, 3)


@pytest.mark.parametrize("content", [b"", b"garbage, not an image", None])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # truncated PNG
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(PatchCoreError, match="bad.png"):
        load_image(path)
    with pytest.raises(PatchCoreError, match="no such image"):
        load_image(tmp_path / "missing.png")


def test_bad_arrays_are_refused():
    with pytest.raises(PatchCoreError):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(PatchCoreError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4), 3.0))
    with pytest.raises(PatchCoreError):
        load_image(12)


def test_preprocess_resizes_crops_and_normalises():
    image = np.full((30, 50, 3), 0.5, np.float32)
    x, geometry = preprocess(image, 32, 24, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 24, 24) and torch.allclose(x, torch.zeros(()), atol=1e-6)
    assert geometry == Geometry((30, 50), 32, 24) and geometry.offset == 4


def test_map_to_original_fills_the_cropped_border_with_the_minimum():
    amap = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
    out = map_to_original(amap, Geometry((8, 8), 8, 4))
    assert out.shape == (8, 8)
    assert out[0, 0] == 1.0 and out[-1, -1] == 1.0  # border: the map's minimum
    np.testing.assert_allclose(out[2:6, 2:6], amap)
    wide = map_to_original(amap, Geometry((5, 13), 8, 4))
    assert wide.shape == (5, 13)


def test_masks_are_resized_and_cropped_like_images():
    mask = np.zeros((16, 16), bool)
    mask[0:8, 0:8] = True
    out = mask_to_input(mask, 8, 4)
    assert out.shape == (4, 4)
    assert out[:2, :2].all() and not out[2:, 2:].any()
