"""The default image-level branch of a single-bank model: a Gaussian of each input's mean patch feature."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from patchcore import PatchCore, PatchCoreError
from patchcore.core.gaussian import matching_affine
from patchcore.detectors import loads
from patchcore.detectors.global_branch import GlobalBranch
from patchcore.persistence import DetectorState
from synthetic import texture

# the default layers (blocks.2) and branch, small and fast
BRANCH = {"resize": 64, "crop": 56, "coreset_ratio": 0.25, "seed": 0}


def shifted(image: np.ndarray, amount: int = 40) -> np.ndarray:
    """A global change: every pixel brighter, no single patch unlike the others."""
    return np.clip(image.astype(np.int16) + amount, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [texture(rng) for _ in range(12)]


@pytest.fixture(scope="module")
def model(images):
    return PatchCore(**BRANCH).fit(images)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, st.integers(2, 30), elements=st.floats(-1e3, 1e3)),
    st.floats(0.01, 100),
    st.floats(-100, 100),
)
def test_the_affine_gives_the_source_the_targets_mean_and_spread(target, slope, offset):
    source = target[::-1] * slope + offset + np.arange(len(target))  # varies whatever target is
    a, b = matching_affine(target, source)
    mapped = a + b * source
    assert b >= 0
    np.testing.assert_allclose(mapped.mean(), target.mean(), atol=1e-6 * (1 + abs(target).max()))
    np.testing.assert_allclose(mapped.std(), target.std(), rtol=1e-6, atol=1e-9)


def test_sources_that_do_not_vary_have_no_affine():
    with pytest.raises(ValueError, match="do not vary"):
        matching_affine(np.array([1.0, 2.0]), np.array([3.0, 3.0]))


def test_fit_holds_out_images_and_puts_the_branch_on_the_banks_scale(model, images):
    branch = model.global_
    assert branch is not None and model.n_train_ == 10  # 2 of 12 held out to calibrate the branch
    assert branch.features.shape == (10, 40) and branch.affine is not None and branch.affine[1] > 0
    # the image score is the larger of the bank's and the branch's; both parts are visible in it
    probe = images[:2] + [shifted(images[0]), shifted(images[1])]
    combined = model.score_samples(probe)
    bank_only = loads(model.to_bytes())
    bank_only.global_ = None  # the same bank without its branch
    bank = bank_only.score_samples(probe)
    assert (combined >= bank - 1e-6).all()
    assert combined[2:].min() > combined[:2].max()  # the global change stands out


def test_too_few_images_fit_the_bank_alone(images, caplog):
    with caplog.at_level(logging.DEBUG, logger="patchcore"):
        small = PatchCore(**BRANCH).fit(images[:6])  # 1 held out: too few to calibrate on
    assert small.global_ is None and small.n_train_ == 6
    assert "too few to calibrate the global branch" in caplog.text
    off = PatchCore(**BRANCH, global_branch=False, coarse_branch=False).fit(images)
    assert off.global_ is None and off.n_train_ == 12


def test_the_branch_survives_a_file_and_tampering_is_refused(model, images, tmp_path):
    path = tmp_path / "m.patchcore"
    model.save(path)
    loaded = PatchCore.load(path)
    np.testing.assert_array_equal(loaded.score_samples(images[:3]), model.score_samples(images[:3]))
    assert loaded.global_.affine == model.global_.affine
    state = model.get_state()
    for name, value in (
        ("global.precision", np.ones((3, 3))),
        ("global.scale", np.zeros(40)),
        ("global.features", np.full((10, 40), np.nan, np.float32)),
    ):
        tensors = {**state.tensors, name: value}
        with pytest.raises(PatchCoreError, match="global branch"):
            PatchCore.from_state(DetectorState(state.kind, state.meta, tensors))
    meta = {**state.meta, "global": {"affine": [1.0, -2.0], "shrinkage": 0.1}}
    with pytest.raises(PatchCoreError, match="positive slope"):
        PatchCore.from_state(DetectorState(state.kind, meta, state.tensors))
    # a file from before the branch: no global_branch setting, no branch; it loads and scores with the bank
    old_config = {k: v for k, v in state.meta["config"].items() if k != "global_branch"}
    old_meta = {k: v for k, v in state.meta.items() if k != "global"} | {"config": old_config}
    old_tensors = {k: v for k, v in state.tensors.items() if not k.startswith("global.")}
    old = PatchCore.from_state(DetectorState(state.kind, old_meta, old_tensors))
    assert old.global_ is None and old.config.global_branch is False
    with pytest.raises(PatchCoreError, match="do not ask for"):
        PatchCore.from_state(DetectorState(state.kind, {**state.meta, "config": old_config}, state.tensors))


def test_partial_fit_and_shards_keep_every_images_mean_feature(model, images):
    rng = np.random.default_rng(9)
    more = [texture(rng) for _ in range(3)]
    extended = loads(model.to_bytes())
    extended.partial_fit(more)
    assert extended.global_.features.shape == (13, 40)
    assert extended.global_.affine == model.global_.affine  # the calibration is kept, like the thresholds
    np.testing.assert_allclose(extended.global_.features[:10], model.global_.features)
    # fit in two shards, merged: the branch's Gaussian covers both shards' images
    driver = PatchCore(**BRANCH)
    train, calibration = driver.calibration_split(images)
    parts = [driver.fit_shard(train[:5], 2), driver.fit_shard(train[5:], 2)]
    merged = driver.merge_shards(parts, calibration)
    assert merged.global_ is not None and merged.global_.features.shape == (10, 40)
    np.testing.assert_allclose(
        np.sort(merged.global_.features, axis=0), np.sort(model.global_.features, axis=0), rtol=1e-5
    )


def test_an_uncalibrated_branch_says_so():
    branch = GlobalBranch.fit(np.random.default_rng(0).normal(size=(5, 4)))
    assert branch is not None and branch.affine is None
    with pytest.raises(PatchCoreError, match="not calibrated"):
        branch.combined([1.0], np.zeros((1, 4)))
    assert GlobalBranch.fit(np.zeros((1, 4))) is None
