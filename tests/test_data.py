import pytest

from patchcore.data import open_dataset, textile
from patchcore.errors import PatchCoreError
from synthetic import make_mvtec


def test_textile_protocol():
    data = textile()
    assert len(data.train) == 200 and data.train == sorted(data.train)
    assert data.train[0].parent.name == "nominal"
    types = [s.defect_type for s in data.test]
    assert types.count("good") == 200 and types.count("local") == 200 and types.count("global") == 200
    good = [s.path for s in data.test if s.label == 0]
    assert not set(good) & set(data.train)
    assert not data.has_masks
    assert open_dataset("textile").train == data.train


def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "cat", n_train=4, n_good=2, n_bad=3)
    data = open_dataset(root)
    assert len(data.train) == 4 and len(data.test) == 5
    bad = [s for s in data.test if s.label == 1]
    assert {s.defect_type for s in bad} == {"blob"}
    assert all(s.mask_path.name == s.path.stem + "_mask.png" for s in bad)
    assert data.has_masks


def test_mvtec_without_masks(tmp_path):
    data = open_dataset(make_mvtec(tmp_path / "cat", masks=False))
    assert not data.has_masks and len(data.test) == 6


def test_plain_folder_is_training_only(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    data = open_dataset(root / "train" / "good")
    assert len(data.train) == 5 and data.test == []


def test_bad_layouts(tmp_path):
    with pytest.raises(PatchCoreError, match="no such folder"):
        open_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchCoreError, match="no images found"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "half" / "test" / "good").mkdir(parents=True)
    with pytest.raises(PatchCoreError, match="train/good"):
        open_dataset(tmp_path / "half")
    (tmp_path / "nofiles" / "train" / "good").mkdir(parents=True)
    with pytest.raises(PatchCoreError, match="no training images"):
        open_dataset(tmp_path / "nofiles")
