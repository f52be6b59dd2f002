"""The multi-level model: several banks and a global Gaussian branch, standardised on held-out good images."""

import json

import numpy as np
import pytest
from sklearn.base import clone

import patchcore
from helpers import run_cli
from patchcore import MultiLevelPatchCore, PatchCore, PatchCoreConfig, PatchCoreError
from patchcore.core.gaussian import fit_gaussian, ledoit_wolf, mahalanobis
from patchcore.detectors import create
from patchcore.detectors.multilevel import member_configs
from synthetic import SMALL, texture

SETTINGS = {**SMALL, "level_sets": ("blocks.1",), "scales": (48,), "global_layers": ("blocks.2",)}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(4)
    return [texture(rng) for _ in range(10)]


@pytest.fixture(scope="module")
def model(images):
    return MultiLevelPatchCore(**SETTINGS, calibration_share=0.3).fit(images)


def test_gaussian_is_the_shrunk_mahalanobis_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) * [1, 2, 3, 4, 5] + 7
    gaussian = fit_gaussian(x)
    q = (x - x.mean(0)) / x.std(0)
    covariance, shrinkage = ledoit_wolf(q)
    assert 0 <= shrinkage <= 1 and shrinkage == gaussian.shrinkage
    expected = np.sqrt(np.einsum("ij,jk,ik->i", q, np.linalg.inv(covariance), q))
    np.testing.assert_allclose(mahalanobis(x, gaussian), expected, rtol=1e-8)
    far = x.mean(0) + 10 * x.std(0)
    assert mahalanobis(far[None], gaussian)[0] > mahalanobis(x, gaussian).max()
    # more dimensions than rows: still finite (shrinkage makes the covariance invertible)
    wide = fit_gaussian(rng.normal(size=(6, 40)))
    assert np.isfinite(mahalanobis(rng.normal(size=(3, 40)), wide)).all()


def test_members_are_layer_sets_times_scales():
    members = member_configs(PatchCoreConfig(**SETTINGS))
    fine = ("blocks.2", "blocks.3")  # SMALL's layers
    assert [(m.layers, m.resize, m.crop) for m in members] == [
        (fine, 64, 56),
        (("blocks.1",), 64, 56),
        (fine, 48, 42),
        (("blocks.1",), 48, 42),
    ]
    # no member carries a branch of its own: the multi-level model's is global_layers
    assert not any(m.multilevel or m.threshold_fpr or m.global_branch for m in members)
    assert not any(m.global_branch for m in member_configs(PatchCoreConfig(level_sets=("blocks.3",))))


def test_parts_are_standardised_and_combined_by_max(model, images):
    assert len(model.models_) == 4 and model.n_calibration_ == 3 and model.gaussian_ is not None
    rng = np.random.default_rng(8)
    probe = [texture(rng), texture(rng, defect=True)]
    parts = [(m.score_samples(probe) - mu) / sd for m, (mu, sd) in zip(model.models_, model.score_stats_)]
    mu, sd = model.global_stats_
    parts.append((model._global_scores(probe) - mu) / sd)
    np.testing.assert_allclose(model.score_samples(probe), np.max(parts, axis=0), rtol=1e-5)
    assert model.score_samples(probe)[1] > model.score_samples(probe)[0]
    assert model.anomaly_maps(probe).shape == (2, 56, 56)  # the first bank's input size, other scales resampled
    assert model.predict(probe[:1])[0].anomaly_map.shape == (48, 48)


def test_mean_combination_and_a_global_branch_alone(images):
    model = MultiLevelPatchCore(**SMALL, global_layers=("blocks.1", "blocks.2"), combine="mean").fit(images)
    assert len(model.models_) == 1
    probe = images[:2]
    bank = (model.models_[0].score_samples(probe) - model.score_stats_[0, 0]) / model.score_stats_[0, 1]
    branch = (model._global_scores(probe) - model.global_stats_[0]) / model.global_stats_[1]
    np.testing.assert_allclose(model.score_samples(probe), (bank + branch) / 2, rtol=1e-5)


def test_save_load_round_trip_and_clone(model, images, tmp_path):
    path = tmp_path / "ml.safetensors"
    model.save(path)
    loaded = patchcore.load(path)
    assert isinstance(loaded, MultiLevelPatchCore) and loaded.config == model.config
    np.testing.assert_allclose(loaded.score_samples(images[:3]), model.score_samples(images[:3]), rtol=1e-6)
    unfitted = clone(model)
    assert unfitted.config == model.config and not hasattr(unfitted, "models_")
    with pytest.raises(patchcore.NotFittedError):
        unfitted.score_samples(images[:1])


def test_thresholds_calibration_and_partial_fit(images):
    model = MultiLevelPatchCore(**SMALL, global_layers=("blocks.2",), threshold_fpr=0.25).fit(images)
    assert model.threshold_ is not None and model.score_scale == "standardized"
    assert model.predict(images[:1])[0].normalized_score is not None
    before, n_train = model.memory_bank_size, model.n_train_
    model.partial_fit(images[:2])
    assert model.memory_bank_size > before and model.n_train_ == n_train + 2
    model.calibrate(images[:4], fpr=0.5)
    assert model.thresholds_.method == "fpr" and model.thresholds_.n_calibration == 4


def test_a_plain_patchcore_refuses_multilevel_settings_and_create_picks_the_class():
    with pytest.raises(PatchCoreError, match="MultiLevelPatchCore"):
        PatchCore(global_layers=("blocks.2",))
    assert isinstance(create(PatchCoreConfig(global_layers=("blocks.2",))), MultiLevelPatchCore)
    assert isinstance(create(PatchCoreConfig()), PatchCore)
    with pytest.raises(PatchCoreError, match="level_sets"):
        PatchCoreConfig(level_sets=("blocks.2+",))
    with pytest.raises(PatchCoreError, match="combine"):
        PatchCoreConfig(combine="median")


def test_cli_fits_and_evaluates_a_multilevel_model(mvtec_dir, tmp_path):
    model = tmp_path / "ml.safetensors"
    flags = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.25", "--global-layers", "blocks.2"]
    done = run_cli("fit", mvtec_dir, "-o", model, *flags, "--level-sets", "blocks.1", "--scales", "48")
    assert done.returncode == 0, done.stderr
    info = run_cli("info", model)
    assert info.returncode == 0 and "blocks.1" in info.stdout, info.stderr
    out = tmp_path / "eval"
    done = run_cli("evaluate", mvtec_dir, "--model", model, "-o", out)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pixel_auroc"] is not None and metrics["config"]["global_layers"] == ["blocks.2"]
    refused = run_cli(
        "fit",
        mvtec_dir,
        "-o",
        tmp_path / "x.safetensors",
        "--backbone",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "--global-layers",
        "blocks.2",
    )
    assert refused.returncode == 1 and "one backbone" in refused.stderr
