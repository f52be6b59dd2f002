"""Model files written by earlier versions keep loading, with the same scores (golden files in tests/golden).

The v1 files were written at commit cf6297f by tests/golden/make_v1_golden.py, before the scoring modes were
renamed: v1's "paper" with image_top_k 20 (the old default) is v2's "mean-top-k", and v1's "official" kept its
top-k as stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import patchcore
from synthetic import texture

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "v1_expected.json").read_text())


def _test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [texture(rng, defect=(i % 2 == 1)) for i in range(6)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_v1_files_load_with_the_same_scores_and_maps(name):
    detector = patchcore.load(GOLDEN / f"{name}.safetensors")
    images = _test_images()
    np.testing.assert_allclose(detector.score_samples(images), EXPECTED[name]["scores"], rtol=1e-5)
    sums = [float(m.sum()) for m in detector.anomaly_maps(images)]
    np.testing.assert_allclose(sums, EXPECTED[name]["map_sums"], rtol=1e-5)
    assert detector.threshold_ == EXPECTED[name]["threshold"]
    assert detector.provenance_["format_version"] == 1


@pytest.mark.parametrize(
    ("name", "scoring", "top_k"),
    [
        ("v1_default", "mean-top-k", 20),
        ("v1_paper_max", "paper", 1),
        ("v1_official_top20", "official", 20),
        ("v1_official_max", "official", 1),
    ],
)
def test_v1_scoring_names_are_migrated_to_what_they_compute(name, scoring, top_k):
    config = patchcore.load(GOLDEN / f"{name}.safetensors").config
    assert (config.scoring, config.image_top_k) == (scoring, top_k)


def test_a_v1_model_saved_again_is_written_as_the_current_version(tmp_path):
    detector = patchcore.load(GOLDEN / "v1_default.safetensors")
    detector.save(tmp_path / "v2.safetensors")
    again = patchcore.load(tmp_path / "v2.safetensors")
    assert again.provenance_["format_version"] == patchcore.persistence.FORMAT_VERSION == 2
    np.testing.assert_allclose(again.score_samples(_test_images()), EXPECTED["v1_default"]["scores"], rtol=1e-5)


def test_migration_of_v1_documents_without_top_k_and_malformed_ones():
    from patchcore.errors import PatchCoreError
    from patchcore.persistence.model_file import migrate

    # files written before image_top_k existed were scored with the max patch score
    assert migrate("patchcore-model", {"config": {"scoring": "paper"}}, 1)["config"] == {
        "scoring": "paper",
        "image_top_k": 1,
    }
    members = {"members": [{"config": {"scoring": "paper", "image_top_k": 20}}, {"config": {"scoring": "official"}}]}
    migrated = migrate("patchcore-ensemble", members, 1)["members"]
    assert [(m["config"]["scoring"], m["config"]["image_top_k"]) for m in migrated] == [
        ("mean-top-k", 20),
        ("official", 1),
    ]
    for broken in ({}, {"config": None}, {"config": ["paper"]}):
        with pytest.raises(PatchCoreError, match="cannot be read"):
            migrate("patchcore-model", broken, 1)


def test_info_prints_the_settings_as_this_version_reads_them():
    from helpers import run_cli

    result = run_cli("info", GOLDEN / "v1_default.safetensors")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["format_version"] == 1 and document["read_as_format_version"] == 2
    assert document["config"]["scoring"] == "mean-top-k" and document["checksum"]
