"""The default coarse bank of a single-bank model: the inputs at half the resolution, deeper layers, its own bank."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import patchcore
from patchcore import PatchCore, PatchCoreConfig, PatchCoreEnsemble, PatchCoreError
from patchcore.core.gaussian import robust_affine
from patchcore.detectors import loads
from patchcore.detectors.coarse_branch import coarse_config, wants_coarse_bank
from patchcore.persistence import DetectorState
from synthetic import texture

# the default layers, global branch and coarse bank, small and fast
BRANCHES = {"resize": 64, "crop": 56, "coreset_ratio": 0.25, "seed": 0}


def smudged(image: np.ndarray) -> np.ndarray:
    """A large, soft defect: a dark region over a third of the image, no sharp edge anywhere."""
    size = image.shape[0]
    y, x = np.mgrid[:size, :size]
    shade = 1 - 0.5 * np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 5) ** 2))
    return (image * shade[..., None]).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [texture(rng) for _ in range(12)]


@pytest.fixture(scope="module")
def model(images):
    return PatchCore(**BRANCHES).fit(images)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, st.integers(4, 40), elements=st.floats(-1e3, 1e3)),
    st.floats(0.01, 100),
    st.floats(-100, 100),
    st.sampled_from([25.0, 50.0, 90.0]),
)
def test_the_robust_affine_matches_the_interquartile_range_and_the_anchor(target, slope, offset, anchor):
    source = target[::-1] * slope + offset + np.arange(len(target))  # varies whatever target is
    a, b = robust_affine(target, source, anchor)
    mapped = a + b * source
    (t25, t75, ta), (m25, m75, ma) = np.percentile(target, [25, 75, anchor]), np.percentile(mapped, [25, 75, anchor])
    scale = 1e-6 * (1 + np.abs(target).max() + np.abs(mapped).max())
    assert b >= 0
    assert m75 - m25 == pytest.approx(t75 - t25, abs=scale)
    assert ma == pytest.approx(ta, abs=scale)


def test_sources_whose_quartiles_coincide_have_no_affine():
    with pytest.raises(ValueError, match="coincide"):
        robust_affine(np.array([1.0, 2.0, 3.0]), np.array([3.0, 3.0, 3.0]))
    with pytest.raises(ValueError, match="percentile"):
        robust_affine(np.array([1.0, 2.0]), np.array([1.0, 3.0]), anchor=120)


def test_the_coarse_config_takes_deeper_layers_and_keeps_its_share_of_patches():
    config = PatchCoreConfig(threshold_fpr=0.05)
    coarse = coarse_config(config)
    assert coarse.input_pool == 1 and coarse.layers == ("blocks.2", "blocks.3") and coarse.image_top_k == 20
    assert not (coarse.global_branch or coarse.coarse_branch) and coarse.threshold_fpr is None
    assert (coarse.resize, coarse.crop) == (config.resize, config.crop)
    assert coarse.coreset_ratio == config.coreset_ratio / 4  # a quarter of the fine bank's rows
    assert coarse_config(config.replace(coreset_size=100)).coreset_size == 25
    assert coarse_config(config.replace(coarse_layers=("blocks.3",))).layers == ("blocks.3",)
    half = coarse_config(config.replace(coarse_pool=2))
    assert half.input_pool == 2 and half.coarse_pool == 1
    assert half.coreset_ratio == config.coreset_ratio  # of a quarter of the patches: a quarter of the rows
    assert half.image_top_k == 5  # 20 of the fine grid's patches; the pooled grid has a quarter of them
    with pytest.raises(PatchCoreError, match="input_pool"):
        PatchCoreConfig(resize=64, input_pool=5)
    with pytest.raises(PatchCoreError, match="coarse_pool=3 .*--no-coarse-branch"):
        PatchCoreConfig(resize=64, input_pool=2, coarse_pool=3)
    assert PatchCoreConfig(resize=64, coarse_pool=8, coarse_branch=False).coarse_pool == 8  # off: not checked


def test_a_coarse_bank_that_would_be_the_fine_banks_twin_is_not_wanted():
    assert wants_coarse_bank(PatchCoreConfig())
    assert not wants_coarse_bank(PatchCoreConfig(coarse_branch=False))
    assert not wants_coarse_bank(PatchCoreConfig(layers=("blocks.2", "blocks.3")))  # the coarse layers' twin
    assert wants_coarse_bank(PatchCoreConfig(layers=("blocks.2", "blocks.3"), coarse_pool=2))  # another scale
    assert not wants_coarse_bank(PatchCoreConfig(backbone="wide_resnet50_2"))  # no coarse defaults of its own
    assert wants_coarse_bank(PatchCoreConfig(backbone="wide_resnet50_2", coarse_layers=("layer3",)))


def test_fit_builds_a_calibrated_coarse_bank_whose_map_is_averaged_in(model, images):
    coarse = model.coarse_
    assert coarse is not None and coarse.map_affine[1] > 0
    assert coarse.model.n_train_ == model.n_train_ == 10  # the same bank images, the same 2 held out
    assert coarse.model.memory_bank_.shape[1] == 40 + 80  # blocks.2 + blocks.3
    assert coarse.model.feature_shape_ == model.feature_shape_ == (7, 7)  # the same input, stride 8
    probe = images[:2] + [smudged(images[0]), smudged(images[1])]
    fine_only = loads(model.to_bytes())
    fine_only.coarse_ = None  # the same model without its coarse bank
    combined = model.score_samples(probe)
    np.testing.assert_array_equal(combined, fine_only.score_samples(probe))  # the image score is the fine bank's
    np.testing.assert_array_equal(combined, [r.score for r in model.infer(probe)])  # with maps too
    maps, fine_maps, coarse_maps = (m.anomaly_maps(probe) for m in (model, fine_only, coarse.model))
    offset, slope = coarse.map_affine
    assert maps.shape == fine_maps.shape == coarse_maps.shape == (4, 56, 56)
    np.testing.assert_allclose(maps, (fine_maps + offset + slope * coarse_maps) / 2, rtol=1e-5, atol=1e-5)
    assert combined[2:].min() > combined[:2].max()  # the large soft defect stands out


def test_the_coarse_bank_at_half_the_resolution(images):
    half = PatchCore(**BRANCHES, coarse_pool=2).fit(images)
    assert half.coarse_.model.feature_shape_ == (4, 4)  # 56 px pooled to 28, stride 8
    (result,) = half.infer(images[:1])
    assert result.map().shape == (56, 56)


def test_too_few_images_fit_the_fine_bank_alone(images):
    small = PatchCore(**BRANCHES).fit(images[:6])  # 1 held out: too few to calibrate on
    assert small.coarse_ is None and small.global_ is None and small.n_train_ == 6
    off = PatchCore(**BRANCHES, coarse_branch=False).fit(images)
    assert off.coarse_ is None and off.global_ is not None and off.n_train_ == 10


def test_the_coarse_bank_survives_a_file_and_tampering_is_refused(model, images, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = PatchCore.load(path)
    np.testing.assert_array_equal(loaded.score_samples(images[:3]), model.score_samples(images[:3]))
    assert loaded.coarse_.map_affine == model.coarse_.map_affine
    state = model.get_state()
    bank = state.tensors["coarse.memory_bank"]
    for tensors, words in (
        ({**state.tensors, "coarse.memory_bank": np.full_like(bank, np.nan)}, "NaN"),
        (
            {**state.tensors, "coarse.memory_bank": bank[:, :7].copy()},
            "^m.safetensors \\(coarse bank\\): memory bank has 7",
        ),
        ({k: v for k, v in state.tensors.items() if k != "coarse.memory_bank"}, "malformed"),
    ):
        with pytest.raises(PatchCoreError, match=words):
            PatchCore.from_state(DetectorState(state.kind, state.meta, tensors), source="m.safetensors")
    coarse_meta = state.meta["coarse"]
    nested = {**coarse_meta, "model": {**coarse_meta["model"], "coarse": coarse_meta}}
    for meta, words in (
        ({**state.meta, "coarse": {**coarse_meta, "map_affine": [1.0, -2.0]}}, "slope positive"),
        ({**state.meta, "coarse": {**coarse_meta, "map_affine": "steep"}}, "two finite numbers"),
        ({**state.meta, "coarse": {**coarse_meta, "map_affine": [10**400, 1]}}, "two finite numbers"),
        ({**state.meta, "coarse": {**coarse_meta, "score_affine": [0.0, 1.0]}}, "must hold model and map_affine"),
        ({**state.meta, "coarse": {"model": coarse_meta["model"]}}, "must hold model and map_affine"),
        ({**state.meta, "coarse": nested}, "without a coarse bank of its own"),
        ({**state.meta, "config": {**state.meta["config"], "coarse_layers": ["blocks.3"]}}, "do not match"),
    ):
        with pytest.raises(PatchCoreError, match=words):
            PatchCore.from_state(DetectorState(state.kind, meta, state.tensors))
    # a file from before the coarse bank: no coarse_branch setting, no coarse bank; it loads and scores without
    old_config = {k: v for k, v in state.meta["config"].items() if k not in ("coarse_branch", "coarse_layers")}
    old_config.pop("input_pool")
    old_config.pop("coarse_pool")
    old_meta = {k: v for k, v in state.meta.items() if k != "coarse"} | {"config": old_config}
    old_tensors = {k: v for k, v in state.tensors.items() if not k.startswith("coarse.")}
    old = PatchCore.from_state(DetectorState(state.kind, old_meta, old_tensors))
    assert old.coarse_ is None and old.config.coarse_branch is False
    with pytest.raises(PatchCoreError, match="do not ask for"):
        PatchCore.from_state(DetectorState(state.kind, {**state.meta, "config": old_config}, state.tensors))


def test_ensemble_members_keep_their_branches_through_a_file_and_hold_out_nothing_more(images, tmp_path):
    members = [PatchCoreConfig(**BRANCHES), PatchCoreConfig(**BRANCHES, layers=("blocks.1", "blocks.2"))]
    ensemble = PatchCoreEnsemble(members, calibration_share=0.25).fit(images)
    for member in ensemble.models_:  # calibrated on the ensemble's 3 held-out images, banks of the other 9
        assert member.coarse_ is not None and member.global_ is not None and member.n_train_ == 9
    path = tmp_path / "ens.safetensors"
    ensemble.save(path)
    loaded = patchcore.load(path)
    assert all(m.coarse_ is not None and m.global_ is not None for m in loaded.models_)
    np.testing.assert_array_equal(loaded.score_samples(images[:3]), ensemble.score_samples(images[:3]))
    # on Ray's path (shards merged) the members are the same
    train, calibration = ensemble.calibration_split(images)
    parts = [ensemble.fit_shard(train[:5], 2), ensemble.fit_shard(train[5:], 2)]
    merged = PatchCoreEnsemble(members, calibration_share=0.25).merge_shards(parts, calibration)
    assert all(m.coarse_ is not None and m.coarse_.map_affine is not None for m in merged.models_)


def test_partial_fit_grows_the_coarse_bank_and_shards_merge_it(model, images):
    rng = np.random.default_rng(9)
    more = [texture(rng) for _ in range(3)]
    extended = loads(model.to_bytes())
    extended.partial_fit(more)
    assert extended.coarse_.model.n_train_ == 13
    assert extended.coarse_.model.memory_bank_.shape[0] >= model.coarse_.model.memory_bank_.shape[0]
    assert extended.coarse_.map_affine == model.coarse_.map_affine  # kept, like the thresholds
    # fit in two shards, merged: a coarse bank of the size one fit keeps, calibrated on the held-out images
    driver = PatchCore(**BRANCHES)
    train, calibration = driver.calibration_split(images)
    parts = [driver.fit_shard(train[:5], 2), driver.fit_shard(train[5:], 2)]
    merged = driver.merge_shards(parts, calibration)
    assert merged.coarse_ is not None and merged.coarse_.map_affine is not None
    assert merged.coarse_.model.memory_bank_.shape == model.coarse_.model.memory_bank_.shape
    assert merged.coarse_.model.n_train_ == 10
    scores = merged.score_samples(images[:2] + [smudged(images[0])])
    assert scores[2] > scores[:2].max()


def test_tiles_and_non_square_inputs_take_the_coarse_bank(images):
    rng = np.random.default_rng(3)
    wide = [texture(rng, 64)[:48] for _ in range(12)]  # 48 x 64
    tiled = PatchCore(resize=48, coreset_ratio=0.25, tile_size=32, seed=0).fit(wide)
    assert tiled.coarse_ is not None
    (result,) = tiled.infer([wide[0]])
    assert result.map().shape == (48, 64)  # stitched at the image's size, fine and coarse alike
    aspect = PatchCore(resize=48, coreset_ratio=0.25, keep_aspect=True, seed=0).fit(wide)
    (result,) = aspect.infer([wide[0]])
    assert aspect.coarse_ is not None and result.map().shape == (48, 64)
