"""Non-square images (keep_aspect) and tiling of large images (tile_size): geometry, model and command line."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli as run
from patchcore import PatchCore, PatchCoreError
from patchcore.imaging import (
    geometry_for,
    map_to_original,
    mask_to_map,
    preprocess,
    stitch_maps,
    tile_coverage,
    tile_geometry,
    tile_positions,
)
from synthetic import SMALL, make_mvtec, texture


def fabric(rng: np.random.Generator, height: int, width: int, blob: tuple[int, int] | None = None) -> np.ndarray:
    """The striped 'fabric' of synthetic.texture at any (H, W); ``blob`` = top-left of an 8 x 8 red defect."""
    x = np.mgrid[:height, :width][1]
    base = 120 + 60 * np.sin(x / 2.0) + rng.normal(0, 8, (height, width))
    image = np.stack([base, base * 0.9, base * 0.8], axis=-1)
    if blob is not None:
        image[blob[0] : blob[0] + 8, blob[1] : blob[1] + 8] = [255, 20, 20]
    return np.clip(image, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ geometry (no model)
def test_keep_aspect_resizes_the_shorter_side_and_crops_the_centre():
    image = np.full((40, 80, 3), 0.5, np.float32)
    x, g = preprocess(image, 64, 56, (0.5,) * 3, (0.5,) * 3, keep_aspect=True)
    assert x.shape == (3, 56, 56) and g.size == (64, 128) and g.offsets == (4, 36)
    x, g = preprocess(image, 64, None, (0.5,) * 3, (0.5,) * 3, keep_aspect=True)
    assert x.shape == (3, 64, 128) and g.input_shape == (64, 128) and g.offsets == (0, 0)
    amap = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    assert map_to_original(amap, g).shape == (40, 80)
    # the square default is untouched by the generalisation
    assert (
        geometry_for((30, 50), 32, 24) == preprocess(np.zeros((30, 50, 3), np.float32), 32, 24, (0,) * 3, (1,) * 3)[1]
    )


def test_masks_follow_the_keep_aspect_geometry():
    mask = np.zeros((40, 80), bool)
    mask[:, 40:] = True  # right half
    g = geometry_for((40, 80), 64, 56, keep_aspect=True)  # resized 64 x 128, crop columns 36..92
    out = mask_to_map(mask, g)
    assert out.shape == (56, 56)
    assert not out[:, : 64 - 36].any() and out[:, 64 - 36 :].all()
    tiled = tile_geometry((40, 80), 32, 0.25, 1.0, 64, None)
    assert mask_to_map(mask, tiled).shape == (40, 80) and np.array_equal(mask_to_map(mask, tiled), mask)
    half = tile_geometry((40, 80), 32, 0.25, 0.5, 64, None)
    assert half.scaled == (20, 40) and mask_to_map(mask, half)[:, 20:].all()


@pytest.mark.parametrize(
    "length,tile,overlap", [(512, 128, 0.25), (100, 64, 0.0), (64, 64, 0.5), (30, 64, 0.25), (1001, 96, 0.9)]
)
def test_tile_positions_cover_with_the_requested_overlap(length, tile, overlap):
    starts = tile_positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length and starts == sorted(set(starts))
    assert all(b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("crop", [None, 48])
def test_tiles_cover_every_pixel(crop):
    g = tile_geometry((200, 333), 64, 0.25, 1.0, 64, crop)
    coverage = tile_coverage(g)
    assert coverage.shape == (200, 333)
    if crop is None:
        assert coverage.min() >= 1.0  # every pixel was seen by at least one whole tile
    else:  # crops lose 8 px of each tile edge: only the image's own border is unseen
        assert coverage[8:-8, 8:-8].min() > 0
    rng = np.random.default_rng(0)
    maps = [rng.random(t.input_shape).astype(np.float32) + 1 for t in g.tiles]
    stitched = stitch_maps(maps, g)
    assert stitched.shape == (200, 333) and np.isfinite(stitched).all() and stitched.min() >= 1.0


def test_one_tile_stitches_to_the_plain_map():
    for crop in (None, 56):
        g = tile_geometry((48, 40), 64, 0.25, 1.0, 64, crop)
        assert len(g.boxes) == 1 and g.boxes[0] == (0, 0, 48, 40)
        amap = np.random.default_rng(1).random(g.tiles[0].input_shape).astype(np.float32)
        np.testing.assert_allclose(stitch_maps([amap], g), map_to_original(amap, g.tiles[0]), rtol=1e-5, atol=1e-6)


def test_bad_tiling_settings_are_refused():
    for bad in ({"tile_size": 8}, {"tile_overlap": 1.0}, {"tile_overlap": -0.1}, {"tile_scale": 0}):
        with pytest.raises(PatchCoreError):
            PatchCore(**bad)


# ------------------------------------------------------------------ model
def test_keep_aspect_gives_maps_at_the_original_non_square_size():
    rng = np.random.default_rng(2)
    train = [fabric(rng, 40, 88) for _ in range(3)]
    for crop in (SMALL["crop"], None):
        model = PatchCore(**{**SMALL, "crop": crop}, keep_aspect=True).fit(train)
        tests = [fabric(rng, 40, 88), fabric(rng, 40, 88, blob=(16, 40)), fabric(rng, 52, 30)]
        predictions = model.predict(tests)
        assert [p.anomaly_map.shape for p in predictions] == [(40, 88), (40, 88), (52, 30)]
        assert predictions[1].score > predictions[0].score
        if crop is None:
            assert model.feature_shape_ == (8, 18)  # 64 x 141 input, stride 8
            with pytest.raises(PatchCoreError, match="predict"):
                model.anomaly_maps(tests)  # three inputs of two shapes
            assert model.anomaly_maps(tests[:2]).shape == (2, 64, 141)


def test_keep_aspect_on_square_images_equals_the_default(rng_images, fitted):
    model = PatchCore(**SMALL, keep_aspect=True).fit(rng_images)
    np.testing.assert_array_equal(model.memory_bank_.numpy(), fitted.memory_bank_.numpy())
    np.testing.assert_array_equal(model.score_samples(rng_images[:2]), fitted.score_samples(rng_images[:2]))


def test_one_tile_as_large_as_the_image_equals_no_tiling(rng_images, fitted):
    model = PatchCore(**SMALL, tile_size=48).fit(rng_images)
    np.testing.assert_array_equal(model.memory_bank_.numpy(), fitted.memory_bank_.numpy())
    rng = np.random.default_rng(3)
    probe = [texture(rng), texture(rng, defect=True)]
    np.testing.assert_array_equal(model.score_samples(probe), fitted.score_samples(probe))
    for tiled, plain in zip(model.predict(probe), fitted.predict(probe)):
        assert tiled.score == plain.score
        np.testing.assert_allclose(tiled.anomaly_map, plain.anomaly_map, rtol=1e-5, atol=1e-6)


def test_tiling_finds_a_small_defect_that_resizing_blurs():
    rng = np.random.default_rng(0)
    train = [fabric(rng, 256, 512) for _ in range(3)]
    good, bad = fabric(rng, 256, 512), fabric(rng, 256, 512, blob=(100, 300))
    tiled = PatchCore(**SMALL, tile_size=128).fit(train)
    assert tiled.n_train_ == 3 and tiled.fit_stats_["full_bank_size"] == 3 * 3 * 5 * 49  # every tile's patches
    plain = PatchCore(**SMALL).fit(train)
    (t_good, t_bad), (p_bad,) = tiled.predict([good, bad]), plain.predict([bad])
    assert t_bad.anomaly_map.shape == (256, 512) and p_bad.anomaly_map.shape == (256, 512)
    peak = np.unravel_index(t_bad.anomaly_map.argmax(), t_bad.anomaly_map.shape)
    assert abs(peak[0] - 104) <= 20 and abs(peak[1] - 304) <= 20
    assert t_bad.score > t_good.score
    assert t_bad.score == pytest.approx(tiled.score_samples([bad])[0])

    def sharpness(amap):
        return amap.max() / np.median(amap)

    assert sharpness(t_bad.anomaly_map) > 1.5 * sharpness(p_bad.anomaly_map)


# ------------------------------------------------------------------ command line


def test_cli_fit_predict_evaluate_with_tiles(tmp_path):
    rng = np.random.default_rng(4)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        Image.fromarray(fabric(rng, 48, 112)).save(good / f"{i}.png")
    test = tmp_path / "test"
    test.mkdir()
    Image.fromarray(fabric(rng, 48, 112, blob=(20, 60))).save(test / "bad.png")
    Image.fromarray(fabric(rng, 60, 40)).save(test / "small.png")
    model = tmp_path / "model.safetensors"
    fast = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.5"]
    result = run("fit", good, "-o", model, *fast, "--tile-size", "48", "--tile-overlap", "0.5", "--keep-aspect")
    assert result.returncode == 0, result.stderr
    config = json.loads(run("info", model).stdout)["config"]
    assert config["tile_size"] == 48 and config["tile_overlap"] == 0.5 and config["keep_aspect"] is True
    out = tmp_path / "out"
    result = run("predict", model, test, "-o", out, "--maps")
    assert result.returncode == 0, result.stderr
    assert np.load(out / "maps" / "bad.npy").shape == (48, 112)
    assert np.load(out / "maps" / "small.npy").shape == (60, 40)

    category = make_mvtec(tmp_path / "cat")
    result = run("evaluate", category, "-o", tmp_path / "eval", *fast, "--tile-size", "32", "--no-keep-aspect")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pixel_metrics_resolution"] == [48, 48]  # the original images, not the 56 px input
    assert metrics["image_auroc"] > 0.5 and metrics["pixel_auroc"] > 0.8 and 0 <= metrics["pro"] <= 1
