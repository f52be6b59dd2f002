import pytest

from patchcore.datasets import open_dataset, textile
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


def _image(path, value=100):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_btad_ok_ko_layout_with_same_name_masks(tmp_path):
    root = tmp_path / "01"
    for i in range(3):
        _image(root / "train" / "ok" / f"{i:04d}.bmp")
    _image(root / "test" / "ok" / "0000.bmp")
    _image(root / "test" / "ko" / "0000.bmp")
    _image(root / "ground_truth" / "ko" / "0000.png", 255)
    data = open_dataset(root)
    assert len(data.train) == 3
    assert [(s.label, s.defect_type) for s in data.test] == [(1, "ko"), (0, "good")]
    assert data.test[0].mask_path.name == "0000.png" and data.has_masks


def test_visa_split_csv(tmp_path):
    root = tmp_path / "VisA"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        _image(root / "candle" / "Data" / "Images" / "Normal" / f"{i}.JPG")
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i}.JPG,")
    _image(root / "candle" / "Data" / "Images" / "Normal" / "9.JPG")
    rows.append("candle,test,normal,candle/Data/Images/Normal/9.JPG,")
    _image(root / "candle" / "Data" / "Images" / "Anomaly" / "5.JPG")
    _image(root / "candle" / "Data" / "Masks" / "Anomaly" / "5.png", 255)
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/5.JPG,candle/Data/Masks/Anomaly/5.png")
    rows.append("capsules,train,normal,capsules/x.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    data = open_dataset(root / "candle")
    assert len(data.train) == 3 and len(data.test) == 2 and data.has_masks
    assert {s.defect_type for s in data.test} == {"good", "anomaly"}


def test_plain_folders_hold_out_good_test_images(tmp_path):
    from patchcore.datasets import folders

    for i in range(10):
        _image(tmp_path / "good" / f"{i}.png")
    _image(tmp_path / "bad" / "scratch" / "a.png")
    _image(tmp_path / "bad" / "dent" / "b.png")
    _image(tmp_path / "masks" / "scratch" / "a_mask.png", 255)
    data = folders(tmp_path / "good", tmp_path / "bad", tmp_path / "masks", seed=0)
    assert len(data.train) == 8 and sum(s.label == 0 for s in data.test) == 2
    assert not set(data.train) & {s.path for s in data.test}
    types = {s.defect_type: s.mask_path for s in data.test if s.label}
    assert set(types) == {"scratch", "dent"} and types["scratch"].name == "a_mask.png" and types["dent"] is None
    assert not data.has_masks  # one defective image lacks a mask: pixel metrics are skipped
    assert len(folders(tmp_path / "good").train) == 10
