import json

import numpy as np
import pytest

import patchcore
from patchcore import PatchCore, PatchCoreConfig, PatchCoreEnsemble, PatchCoreError
from synthetic import SMALL, texture


def _members():
    return [PatchCoreConfig(**SMALL), PatchCoreConfig(**{**SMALL, "layers": ("blocks.1", "blocks.2")})]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(4)
    return [texture(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def ensemble(images):
    return PatchCoreEnsemble(_members(), calibration_share=0.25).fit(images)


def test_members_are_standardised_on_held_out_good_images(ensemble, images):
    assert ensemble.n_train_ == 6 and ensemble.n_calibration_ == 2
    assert all(m.n_train_ == 6 for m in ensemble.models_)
    rng = np.random.default_rng(8)
    probe = [texture(rng), texture(rng, defect=True)]
    member_scores = [m.score_samples(probe) for m in ensemble.models_]
    expected = np.mean([(s - mu) / sd for s, (mu, sd) in zip(member_scores, ensemble.score_stats_)], axis=0)
    np.testing.assert_allclose(ensemble.score_samples(probe), expected, rtol=1e-5)
    assert expected[1] > expected[0]
    maps = ensemble.anomaly_maps(probe)
    assert maps.shape == (2, 56, 56)
    assert ensemble.predict(probe[:1])[0].anomaly_map.shape == (48, 48)


def test_ensemble_save_load_round_trip(ensemble, images, tmp_path):
    path = tmp_path / "ens.safetensors"
    ensemble.save(path)
    loaded = patchcore.load(path)
    assert isinstance(loaded, PatchCoreEnsemble)
    np.testing.assert_array_equal(loaded.score_samples(images[:3]), ensemble.score_samples(images[:3]))
    with pytest.raises(PatchCoreError, match="ensemble"):
        PatchCore.load(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(PatchCoreError, match="checksum"):
        patchcore.load(path)


def test_ensemble_needs_aligned_members(images):
    with pytest.raises(PatchCoreError, match="at least two"):
        PatchCoreEnsemble(_members()[:1]).fit(images)
    with pytest.raises(PatchCoreError, match="must share resize"):
        PatchCoreEnsemble([PatchCoreConfig(**SMALL), PatchCoreConfig(resize=64, crop=48)]).fit(images)


def test_ensemble_thresholds_from_the_held_out_images(images):
    ensemble = PatchCoreEnsemble(_members(), calibration_share=0.25, threshold_fpr=0.5).fit(images)
    thresholds = ensemble.thresholds_
    assert thresholds.method == "fpr" and thresholds.n_calibration == 2 and thresholds.pixel is not None
    # the members hold nothing out of their own: the ensemble's share serves them all
    assert all(m.n_train_ == 6 and m.threshold_ is None for m in ensemble.models_)
    rng = np.random.default_rng(8)
    probe = [texture(rng), texture(rng, defect=True)]
    decisions = [ensemble.decide(s) for s in ensemble.score_samples(probe)]
    assert all(d["threshold"] == thresholds.image for d in decisions)
    # standardised scores can be negative: the normalised score is a logistic, 0.5 at the threshold
    assert ensemble.decide(thresholds.image)["normalized_score"] == 0.5
    assert (
        0
        < ensemble.decide(thresholds.image - 5)["normalized_score"]
        < 0.5
        < ensemble.decide(thresholds.image + 5)["normalized_score"]
        < 1
    )


def test_ensemble_calibrate_set_threshold_and_partial_fit(ensemble, images, tmp_path):
    rng = np.random.default_rng(11)
    more = [texture(rng) for _ in range(3)]
    copy = PatchCoreEnsemble.from_state(ensemble.get_state())
    copy.calibrate(more, fpr=0.4)
    assert copy.thresholds_.method == "fpr" and copy.thresholds_.n_calibration == 3
    copy.set_threshold(-0.5)  # standardised: any finite value
    assert copy.threshold_ == -0.5 and copy.decide(0.0)["is_anomalous"]
    with pytest.raises(PatchCoreError, match="finite"):
        copy.set_threshold(float("nan"))
    sizes = [m.memory_bank_size for m in copy.models_]
    copy.partial_fit(more)
    assert copy.n_train_ == ensemble.n_train_ + 3 and all(m.n_train_ == 9 for m in copy.models_)
    assert all(m.memory_bank_size >= s for m, s in zip(copy.models_, sizes))
    copy.save(tmp_path / "e.safetensors")
    again = patchcore.load(tmp_path / "e.safetensors")
    assert again.threshold_ == -0.5 and again.n_train_ == copy.n_train_


def test_ensemble_honours_its_batch_size(ensemble, images, monkeypatch):
    seen = []
    member = ensemble.models_[0]
    original = member.infer

    def spy(chunk, **kwargs):
        seen.append(len(chunk))
        return original(chunk, **kwargs)

    monkeypatch.setattr(member, "infer", spy)
    monkeypatch.setattr(ensemble, "batch_size", 3)
    scores = ensemble.score_samples(images)
    assert seen == [3, 3, 2]
    monkeypatch.setattr(ensemble, "batch_size", None)
    np.testing.assert_allclose(ensemble.score_samples(images), scores, rtol=1e-6)


def test_state_round_trip_without_a_file(ensemble, images):
    state = ensemble.get_state()
    assert state.kind == "patchcore-ensemble"
    assert set(state.tensors) == {f"member{i}.{name}" for i in (0, 1) for name in ("memory_bank", "bank_source")}
    copy = PatchCoreEnsemble.from_state(state)
    np.testing.assert_array_equal(copy.score_samples(images[:2]), ensemble.score_samples(images[:2]))
    json.dumps(state.meta)  # the meta is plain JSON


def test_ensemble_runtime_settings_are_checked(ensemble):
    copy = PatchCoreEnsemble.from_state(ensemble.get_state(), chunk_size=64, batch_size=2)
    assert all(m.chunk_size == 64 and m.batch_size == 2 for m in copy.models_)
    with pytest.raises(PatchCoreError, match="cannot apply to an ensemble"):
        PatchCoreEnsemble.from_state(ensemble.get_state(), weights="lite0.pth")


def test_an_ensemble_from_the_command_line_takes_negative_thresholds():
    from patchcore.cli import build_parser
    from patchcore.cli.options import make_detector

    args = build_parser().parse_args(
        ["fit", "DATA", "-o", "m", "--backbone", "efficientnet_lite0", "efficientnet_lite1", "--threshold", "-0.5"]
    )
    detector = make_detector(args)
    assert isinstance(detector, PatchCoreEnsemble) and detector.threshold == -0.5
    assert all(c.threshold is None for c in detector.members)
    args = build_parser().parse_args(["fit", "DATA", "-o", "m", "--threshold", "-0.5"])
    with pytest.raises(PatchCoreError, match="positive"):
        make_detector(args)
