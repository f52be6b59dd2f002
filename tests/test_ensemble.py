import json

import numpy as np
import pytest

import patchcore
from patchcore import PatchCore, PatchCoreConfig, PatchCoreEnsemble, PatchCoreError
from synthetic import SMALL, texture


def _members():
    return [PatchCoreConfig(**SMALL), PatchCoreConfig(**SMALL, layers=("blocks.1", "blocks.2"))]


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
