import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore import PatchCore, PatchCoreError
from patchcore.core.thresholds import f1_threshold, fpr_threshold, normalized_scores, split_calibration
from synthetic import SMALL, texture


def test_split_calibration_is_a_seeded_partition():
    fit, cal = split_calibration(10, 0.2, seed=0)
    assert len(cal) == 2 and len(fit) == 8 and not set(fit) & set(cal)
    assert sorted([*fit, *cal]) == list(range(10))
    assert np.array_equal(split_calibration(10, 0.2, seed=0)[1], cal)
    with pytest.raises(PatchCoreError, match="add good images"):
        split_calibration(1, 0.5, seed=0)


def test_fpr_threshold_flags_the_requested_share_of_good_scores():
    scores = np.arange(1, 101, dtype=float)
    t = fpr_threshold(scores, 0.05)
    assert (scores > t).mean() == pytest.approx(0.05, abs=0.011)
    with pytest.raises(PatchCoreError):
        fpr_threshold(scores, 1.5)


def test_fpr_threshold_warns_when_too_few_images(caplog):
    fpr_threshold(np.array([1.0, 2.0, 3.0]), 0.05)
    assert "only 3 good calibration images" in caplog.text


def test_f1_threshold_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = rng.normal(labels * 1.0, 1.0)

    def f1(t):
        predicted = scores >= t
        tp = (predicted & labels).sum()
        return 2 * tp / (predicted.sum() + labels.sum())

    best = max(f1(t) for t in scores)
    assert f1(f1_threshold(labels, scores)) == pytest.approx(best)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 100), st.lists(st.floats(0, 1e4), min_size=1, max_size=20))
def test_normalized_score_is_half_at_the_threshold_and_monotone(threshold, raw):
    assert normalized_scores(np.array([threshold]), threshold)[0] == pytest.approx(0.5)
    values = normalized_scores(np.sort(np.array(raw)), threshold)
    assert np.all(np.diff(values) >= 0) and np.all((values >= 0) & (values < 1))


def test_fit_with_threshold_fpr_holds_out_calibration_images(rng_images, tmp_path):
    rng = np.random.default_rng(3)
    images = rng_images + [texture(rng) for _ in range(4)]
    model = PatchCore(**SMALL, threshold_fpr=0.2, calibration_share=0.3).fit(images)
    assert model.n_train_ == 7 and model.thresholds_.n_calibration == 3
    assert model.threshold_ > 0 and model.thresholds_.pixel > 0
    good = model.predict([texture(rng) for _ in range(3)])
    bad = model.predict([texture(rng, defect=True) for _ in range(3)])
    assert all(p.is_anomalous for p in bad) and all(p.normalized_score > 0.5 for p in bad)
    assert all(p.threshold == model.threshold_ for p in good)
    path = tmp_path / "m.safetensors"
    model.save(path)
    assert PatchCore.load(path).thresholds_ == model.thresholds_


def test_manual_threshold_and_none(rng_images):
    model = PatchCore(**SMALL, threshold=1.5).fit(rng_images)
    assert model.threshold_ == 1.5 and model.n_train_ == len(rng_images)
    plain = PatchCore(**SMALL).fit(rng_images)
    assert plain.threshold_ is None and plain.predict(rng_images[:1])[0].is_anomalous is None
    with pytest.raises(PatchCoreError):
        PatchCore(threshold=-1.0)
