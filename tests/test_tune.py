"""Settings chosen without defect samples: synthetic defects, the grid, the pick, ``patchcore tune``."""

import csv
import math

import numpy as np
import pytest

import patchcore
from helpers import run_cli
from patchcore import PatchCoreError
from patchcore.tune import DEFECTS, Candidate, make_defects, pick, tune
from patchcore.tune.defects import smooth_noise
from patchcore.tune.search import auroc_standard_error
from synthetic import SMALL, texture


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [texture(rng, size=48) for _ in range(12)]


def test_defects_are_seeded_masked_and_change_the_image(images):
    made = make_defects(images[:5], seed=7)
    again = make_defects(images[:5], seed=7)
    assert [k for _, _, k in made] == list(DEFECTS)
    for (image, mask, kind), (same, same_mask, _), good in zip(made, again, images):
        assert image.shape == good.shape and image.dtype == np.uint8 and mask.shape == good.shape[:2]
        np.testing.assert_array_equal(image, same)
        np.testing.assert_array_equal(mask, same_mask)
        assert mask.any(), kind
        assert np.abs(image.astype(int) - good.astype(int))[mask].mean() > 1, kind
        if kind != "texture":  # local kinds leave the rest of the image alone
            np.testing.assert_array_equal(image[~mask], good[~mask])
    assert not all(np.array_equal(a, b) for (a, _, _), (b, _, _) in zip(made, make_defects(images[:5], seed=8)))
    noise = smooth_noise((20, 30), 5, np.random.default_rng(0))
    assert noise.shape == (20, 30) and noise.min() == 0 and math.isclose(float(noise.max()), 1, rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown defect"):
        make_defects(images[:2], 0, ("dent",))


def test_pick_takes_the_cheapest_of_the_near_best():
    rows = [
        Candidate("slow", {}, 0.950, fit_seconds=10, predict_seconds_per_image=0.1),
        Candidate("fast", {}, 0.947, fit_seconds=2, predict_seconds_per_image=0.02),
        Candidate("poor", {}, 0.800, fit_seconds=1, predict_seconds_per_image=0.01),
        Candidate("broken", {}, error="boom"),
    ]
    assert pick(rows).name == "fast"
    assert pick(rows, tolerance=0.001).name == "slow"
    with pytest.raises(PatchCoreError, match="no candidate"):
        pick(rows[3:])


def test_pick_keeps_the_defaults_unless_beaten_by_more_than_the_noise():
    se = auroc_standard_error(0.95, 40, 40)
    assert 0.02 < se < 0.03 and auroc_standard_error(1.0, 40, 40) == 0.0
    assert auroc_standard_error(0.95, 400, 400) < se / 3  # more images, less noise
    best = Candidate("best", {}, 0.95, fit_seconds=1, predict_seconds_per_image=0.01, standard_error=se)
    near = Candidate("default", {}, 0.95 - se, fit_seconds=9, predict_seconds_per_image=0.1, standard_error=se)
    far = Candidate("default", {}, 0.95 - 2 * se, fit_seconds=9, predict_seconds_per_image=0.1, standard_error=se)
    assert pick([best, near]).name == "default"  # within the noise: the defaults, though slower
    assert pick([best, far]).name == "best"
    assert pick([best, Candidate("default", {}, error="boom")]).name == "best"


def test_tune_scores_the_grid_and_fits_the_pick(images):
    grid = {"single": {}, "global": {"global_layers": ["blocks.2"]}, "bad": {"layers": ["blocks.99"]}}
    base = {k: v for k, v in SMALL.items() if k != "layers"}  # the candidates choose the layers
    detector, candidates, chosen = tune(images, base, given=list(base), grid=grid)
    assert [c.name for c in candidates] == ["single", "global", "bad"]
    assert candidates[2].error is not None and chosen.name != "bad"
    for c in candidates[:2]:
        assert 0 <= c.synthetic_auroc <= 1 and set(c.by_kind) == set(DEFECTS) and c.fit_seconds > 0
    assert detector.n_train_ + getattr(detector, "n_calibration_", 0) == len(images)
    assert detector.config.resize == 64  # the fixed settings win over the candidates and the auto geometry


def test_tune_command_writes_the_model_and_the_table(mvtec_dir, tmp_path):
    model = tmp_path / "tuned.safetensors"
    done = run_cli(
        "tune",
        mvtec_dir,
        "-o",
        model,
        "--grid",
        "default",
        "bank-only",
        "--resize",
        "64",
        "--crop",
        "56",
        "--coreset-ratio",
        "0.25",
        "--holdout-share",
        "0.4",
    )
    assert done.returncode == 0, done.stderr
    assert "<- chosen" in done.stdout
    rows = list(csv.DictReader((tmp_path / "tuned.tune.csv").open()))
    assert [r["name"] for r in rows] == ["default", "bank-only"] and sum(r["chosen"] == "true" for r in rows) == 1
    assert patchcore.load(model).config.resize == 64
    bad = run_cli("tune", mvtec_dir, "-o", model, "--holdout-share", "1.5")
    assert bad.returncode == 1 and "holdout-share" in bad.stderr
