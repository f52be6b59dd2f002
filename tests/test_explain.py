"""Where memory-bank rows come from (bank_source, train_paths) and explain(): through in-memory, streaming and
random coresets, partial_fit, tiles, ensembles, files, and model files that predate the record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import patchcore
from patchcore import PatchCore, PatchCoreEnsemble
from patchcore.config import PatchCoreConfig
from patchcore.errors import PatchCoreError
from synthetic import SMALL, _save, texture

GOLDEN = Path(__file__).parent / "golden" / "v1_default.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    root = tmp_path_factory.mktemp("explain") / "data"
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        path = root / "good" / f"{i}.png"
        _save(texture(rng), path)
        paths.append(path)
    return root, paths, texture(rng, defect=True)


def assert_rows_match_their_source(model: PatchCore, images: list) -> None:
    """Every bank row equals the patch feature of the image and grid cell its source names."""
    features = model.extract_features(images)  # (N, h, w, D): square inputs, one per image
    bank = model.memory_bank_.cpu().numpy()
    source = model.bank_source_
    assert source is not None and source.shape == (bank.shape[0], 8)
    for row, (image, tile, r, c, top, left, bottom, right) in zip(bank, source):
        assert tile == 0
        np.testing.assert_allclose(row, features[image, r, c], rtol=1e-4, atol=1e-4)
        assert 0 <= top < bottom <= 48 and 0 <= left < right <= 48


@pytest.mark.parametrize(
    "settings", [{}, {"coreset_method": "random"}, {"max_bank_memory": 1}], ids=["greedy", "random", "streaming"]
)
def test_each_bank_row_records_the_image_and_cell_it_came_from(data, settings):
    root, paths, _ = data
    images = paths * 2 if settings else paths  # streaming: enough patches to reduce shards within 1 MiB
    model = PatchCore(**SMALL, **settings).fit(images, root=root)
    if "max_bank_memory" in settings:
        assert model.fit_stats_["shard_reductions"] > 0  # the streaming path really reduced shards
    assert model.train_paths_ == [f"good/{i % 5}.png" for i in range(len(images))]
    assert_rows_match_their_source(model, images)


def test_partial_fit_appends_sources_and_arrays_have_no_path(data):
    root, paths, _ = data
    model = PatchCore(**SMALL).fit(paths[:3], root=root)
    extra = texture(np.random.default_rng(9))
    model.partial_fit([paths[3], extra], root=root)
    assert model.train_paths_ == ["good/0.png", "good/1.png", "good/2.png", "good/3.png", None]
    assert_rows_match_their_source(model, [*paths[:4], extra])


def test_sources_survive_the_model_file_and_old_files_say_not_recorded(data, tmp_path):
    root, paths, bad = data
    model = PatchCore(**SMALL).fit(paths, root=root)
    model.save(tmp_path / "m.safetensors")
    again = patchcore.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(again.bank_source_, model.bank_source_)
    assert again.train_paths_ == model.train_paths_
    old = patchcore.load(GOLDEN)
    assert old.bank_source_ is None
    explanation = old.explain(bad)
    assert explanation.status.startswith("not recorded") and explanation.nearest_crop is None
    old.partial_fit([paths[0]])  # an old model grows a record for its new rows only
    assert (old.bank_source_[:, 0] == -1).sum() > 0 and old.train_paths_ == ["0.png"]


def test_explain_names_the_anomalous_patch_and_crops_the_nearest_normal_one(data):
    root, paths, bad = data
    model = PatchCore(**SMALL).fit(paths, root=root)
    explanation = model.explain(bad, data_root=root)
    assert explanation.score == pytest.approx(float(model.score_samples([bad])[0]))
    top, left, bottom, right = explanation.patch["box"]
    assert 0 <= top < bottom <= 48 and 0 <= left < right <= 48
    assert explanation.status == "ok" and explanation.nearest["path"].startswith("good/")
    assert explanation.nearest_crop is not None and explanation.nearest_crop.dtype == np.uint8
    assert explanation.patch_crop is not None and explanation.patch_crop.shape[2] == 3
    # the crop shows the recorded box of the recorded training image
    image = np.asarray(patchcore.imaging.read_image_file(root / explanation.nearest["path"]))
    t, lft, b, r = explanation.nearest["crop_box"]
    np.testing.assert_array_equal(explanation.nearest_crop, np.round(image[t:b, lft:r] * 255).astype(np.uint8))
    elsewhere = model.explain(bad)  # no data folder: where it came from, but no crop
    assert elsewhere.nearest["path"] == explanation.nearest["path"] and elsewhere.nearest_crop is None
    assert "no data folder" in elsewhere.status


def test_explain_with_tiles_and_the_ensemble_message(data, tmp_path):
    root, paths, bad = data
    tiled = PatchCore(**SMALL, tile_size=32).fit(paths[:3], root=root)
    assert set(tiled.bank_source_[:, 1]) > {0}  # rows from several tiles
    explanation = tiled.explain(bad, data_root=root)
    assert explanation.status == "ok" and explanation.patch["tile"] >= 0
    members = [PatchCoreConfig(**SMALL), PatchCoreConfig(**{**SMALL, "layers": ("blocks.1", "blocks.2")})]
    ensemble = PatchCoreEnsemble(members, calibration_share=0.4).fit(paths, root=root)
    assert all(m.bank_source_ is not None for m in ensemble.models_)
    ensemble.save(tmp_path / "ens.safetensors")
    again = patchcore.load(tmp_path / "ens.safetensors")
    for before, after in zip(ensemble.models_, again.models_):
        np.testing.assert_array_equal(before.bank_source_, after.bank_source_)
    with pytest.raises(PatchCoreError, match="not available for a PatchCoreEnsemble"):
        ensemble.explain(bad)
