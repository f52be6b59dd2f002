"""Data sets on disk: the MVTec AD layout, a plain folder of good images, and the embedded textile set.

A :class:`Dataset` is only lists of paths and labels; images are read later, by the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PatchCoreError
from .images import list_images

logger = logging.getLogger(__name__)

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """A test image: label 0 = good, 1 = defective; ``defect_type`` is its folder name ("good" if good)."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    train: list[Path]
    test: list[Sample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when every defective test image has a ground-truth mask (pixel metrics possible)."""
        defective = [s for s in self.test if s.label == 1]
        return bool(defective) and all(s.mask_path is not None for s in defective)


def open_dataset(spec: str | os.PathLike) -> Dataset:
    """``textile``, an MVTec-layout category folder (has ``train/good``), or a plain folder of good images."""
    if str(spec) == "textile":
        return textile()
    root = Path(spec)
    if not root.exists():
        raise PatchCoreError(f"{root}: no such folder (DATA is 'textile', an MVTec category folder or a folder of images)")
    if not root.is_dir():
        raise PatchCoreError(f"{root}: DATA must be a folder, or 'textile'")
    if (root / "train").is_dir() or (root / "test").is_dir():
        return mvtec(root)
    return image_folder(root)


def image_folder(root: str | os.PathLike) -> Dataset:
    """Every image under ``root`` (recursive) is a good training image; no test split."""
    root = Path(root)
    images = list_images(root)
    if not images:
        raise PatchCoreError(f"{root}: no images found (looked for {', '.join(('png', 'jpg', 'bmp', 'tif'))} files, recursively)")
    return Dataset(root.name, images)


def mvtec(root: str | os.PathLike) -> Dataset:
    """MVTec AD layout: ``train/good/*``, ``test/<type>/*``, ``ground_truth/<type>/<name>_mask.png``."""
    root = Path(root)
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise PatchCoreError(
            f"{root}: looks like an MVTec-layout category but has no train/good folder; "
            "put the good training images in train/good"
        )
    train = list_images(train_dir)
    if not train:
        raise PatchCoreError(f"{train_dir}: no training images")
    test: list[Sample] = []
    missing_masks = 0
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            label = 0 if type_dir.name == GOOD else 1
            for path in list_images(type_dir):
                mask = None
                if label:
                    candidate = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                    if candidate.is_file():
                        mask = candidate
                    else:
                        missing_masks += 1
                test.append(Sample(path, label, type_dir.name, mask))
    dataset = Dataset(root.name, train, test)
    defective = sum(s.label for s in test)
    if defective and missing_masks and missing_masks < defective:
        logger.warning(
            "%s: %d of %d defective test images have no ground_truth mask; pixel metrics are skipped",
            root, missing_masks, defective,
        )
    return dataset


# The textile protocol of SPEC.md: train on the first 200 nominal images; test on nominal 801-1000,
# local 1-200 and global 1-200 (all sorted by file name).
TEXTILE_TRAIN = slice(0, 200)
TEXTILE_TEST_GOOD = slice(800, 1000)
TEXTILE_TEST_DEFECT = slice(0, 200)


def textile() -> Dataset:
    """The simulated textile images shipped by ``conformal-clip-data`` (image labels, no masks)."""
    try:
        import conformal_clip_data as ccd
    except ImportError as exc:
        raise PatchCoreError("the 'textile' data set needs: pip install conformal-clip-data") from exc
    nominal = list_images(ccd.nominal_dir())
    local = list_images(ccd.local_dir())
    global_ = list_images(ccd.global_dir())
    if len(nominal) < 1000 or len(local) < 200 or len(global_) < 200:
        raise PatchCoreError("the installed conformal-clip-data lacks images: reinstall it (pip install -U conformal-clip-data)")
    test = [Sample(p, 0, GOOD) for p in nominal[TEXTILE_TEST_GOOD]]
    test += [Sample(p, 1, "local") for p in local[TEXTILE_TEST_DEFECT]]
    test += [Sample(p, 1, "global") for p in global_[TEXTILE_TEST_DEFECT]]
    return Dataset("textile", nominal[TEXTILE_TRAIN], test)
