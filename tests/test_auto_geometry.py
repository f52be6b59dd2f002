"""The input geometry chosen from the training images, and fixed settings winning over it."""

import numpy as np
from PIL import Image

import patchcore
from helpers import run_cli
from patchcore import PatchCoreConfig
from patchcore.imaging.auto_geometry import adapt_geometry, choose_geometry, image_sizes


def test_resize_follows_the_median_shorter_side_within_bounds():
    assert choose_geometry([(250, 250)] * 5)[0]["resize"] == 384  # textile: 1.5x, the measured default
    assert choose_geometry([(1024, 1024)] * 5)[0]["resize"] == 384  # large images: capped at the default's cost
    assert choose_geometry([(48, 48)] * 5)[0]["resize"] == 224
    assert choose_geometry([(200, 300)] * 5)[0]["resize"] == 288
    settings, reason = choose_geometry([(270, 100), (300, 630), (250, 320), (400, 300)])
    assert settings == {"resize": 384, "crop": None, "keep_aspect": False} and "aspects vary" in reason
    assert "aspects agree" in choose_geometry([(250, 250)] * 3)[1]
    assert choose_geometry([]) == ({}, "no readable training image sizes: the fixed geometry is kept")


def test_sizes_come_from_headers_arrays_and_pil_images(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path)
    assert image_sizes([path, np.zeros((5, 7, 3)), Image.new("RGB", (9, 4)), tmp_path / "missing.png"]) == [
        (20, 30),
        (5, 7),
        (4, 9),
    ]


def test_fixed_settings_and_auto_geometry_off_keep_the_geometry():
    images = [np.zeros((48, 48, 3), np.uint8)] * 3
    chosen = adapt_geometry(PatchCoreConfig(), images)
    assert chosen.resize == 224 and "48 x 48" in chosen.geometry_reason
    assert adapt_geometry(PatchCoreConfig(resize=64), images, given={"resize": 64}).resize == 64
    assert adapt_geometry(PatchCoreConfig(auto_geometry=False), images).geometry_reason is None


def test_fit_stores_the_choice_and_its_reason(mvtec_dir, tmp_path):
    model = tmp_path / "m.safetensors"
    done = run_cli("-v", "fit", mvtec_dir, "-o", model, "--coreset-ratio", "0.25")
    assert done.returncode == 0, done.stderr
    assert "input geometry: " in done.stderr  # logged
    config = patchcore.load(model).config
    assert config.resize == 224 and "48 x 48" in config.geometry_reason
    fixed = tmp_path / "f.safetensors"
    assert run_cli("fit", mvtec_dir, "-o", fixed, "--resize", "64", "--coreset-ratio", "0.25").returncode == 0
    config = patchcore.load(fixed).config
    assert config.resize == 64 and config.geometry_reason is None
    refused = run_cli("fit", mvtec_dir, "-o", fixed, "--geometry-reason", "x")  # recorded by fit: no flag
    assert refused.returncode == 2 and "unrecognized" in refused.stderr
