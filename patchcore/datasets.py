"""Data sets on disk: MVTec AD and its kin (MPDD, BTAD), VisA, plain folders, and the embedded textile set.

A :class:`Dataset` is only lists of paths and labels; images are read later, by the model.
:data:`LAYOUTS` is the one place to add a data layout: a test that recognises its folder and the
function that opens it, tried in order by :func:`open_dataset`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .core.thresholds import split_calibration
from .errors import PatchCoreError
from .imaging import list_images

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
    """Open DATA by its layout: ``textile``, or the first of :data:`LAYOUTS` that recognises the folder
    (VisA category, MVTec AD / MPDD / BTAD category), otherwise a plain folder of good images."""
    if str(spec) == "textile":
        return textile()
    root = Path(spec)
    if not root.exists():
        raise PatchCoreError(
            f"{root}: no such folder (DATA is 'textile', an MVTec category folder or a folder of images)"
        )
    if not root.is_dir():
        raise PatchCoreError(f"{root}: DATA must be a folder, or 'textile'")
    for recognises, open_layout in LAYOUTS:
        if recognises(root):
            return open_layout(root)
    return image_folder(root)


def image_folder(root: str | os.PathLike) -> Dataset:
    """Every image under ``root`` (recursive) is a good training image; no test split."""
    root = Path(root)
    images = list_images(root)
    if not images:
        raise PatchCoreError(
            f"{root}: no images found (looked for {', '.join(('png', 'jpg', 'bmp', 'tif'))} files, recursively)"
        )
    return Dataset(root.name, images)


GOOD_NAMES = (GOOD, "ok")  # MVTec AD and MPDD say "good", BTAD says "ok"


def _find_mask(folder: Path, stem: str) -> Path | None:
    """MVTec/MPDD name masks <stem>_mask.png; BTAD <stem>.png (or .bmp)."""
    for name in (f"{stem}_mask.png", f"{stem}.png", f"{stem}.bmp", f"{stem}_mask.bmp"):
        if (folder / name).is_file():
            return folder / name
    return None


def mvtec(root: str | os.PathLike) -> Dataset:
    """MVTec AD layout (and MPDD, BTAD): ``train/good/*``, ``test/<type>/*``, ``ground_truth/<type>/<name>_mask.png``.

    BTAD's ``ok``/``ko`` folders and ``<name>.png`` masks are read the same way.
    """
    root = Path(root)
    train_dir = next((root / "train" / g for g in GOOD_NAMES if (root / "train" / g).is_dir()), root / "train" / GOOD)
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
            label = 0 if type_dir.name in GOOD_NAMES else 1
            for path in list_images(type_dir):
                mask = _find_mask(root / "ground_truth" / type_dir.name, path.stem) if label else None
                missing_masks += int(label == 1 and mask is None)
                test.append(Sample(path, label, GOOD if not label else type_dir.name, mask))
    dataset = Dataset(root.name, train, test)
    defective = sum(s.label for s in test)
    if defective and missing_masks and missing_masks < defective:
        logger.warning(
            "%s: %d of %d defective test images have no ground_truth mask; pixel metrics are skipped",
            root,
            missing_masks,
            defective,
        )
    return dataset


VISA_SPLIT = Path("split_csv") / "1cls.csv"


def visa(category_dir: str | os.PathLike) -> Dataset:
    """A VisA category: rows of the parent's ``split_csv/1cls.csv`` (object,split,label,image,mask) for it.

    Paths in the CSV are relative to the VisA root; label is "normal" or "anomaly"; defect type "anomaly".
    """
    import csv

    category_dir = Path(category_dir)
    root, name = category_dir.parent, category_dir.name
    train: list[Path] = []
    test: list[Sample] = []
    with open(root / VISA_SPLIT, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"object", "split", "label", "image"}
        if not needed <= set(reader.fieldnames or ()):
            raise PatchCoreError(f"{root / VISA_SPLIT}: expected the columns {', '.join(sorted(needed))}, mask")
        for row in reader:
            if row["object"] != name:
                continue
            path = root / row["image"]
            defective = row["label"].strip().lower() != "normal"
            if row["split"].strip().lower() == "train":
                if not defective:
                    train.append(path)
                continue
            mask = root / row["mask"] if defective and row.get("mask") else None
            test.append(Sample(path, int(defective), "anomaly" if defective else GOOD, mask))
    if not train:
        raise PatchCoreError(f"{root / VISA_SPLIT}: no training rows for object {name!r}")
    return Dataset(name, sorted(train), test)


def folders(
    good: str | os.PathLike,
    defective: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    test_share: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Plain folders: good images (a seeded ``test_share`` of them held out as test images when defective
    images are given), defective images (sub-folders become defect types), and optional masks named like
    the defective images (``<name>.png`` or ``<name>_mask.png``, same relative folder)."""
    good_images = image_folder(good).train
    if defective is None:
        return Dataset(Path(good).name, good_images)
    try:
        keep, held_out = split_calibration(len(good_images), test_share, seed)
    except PatchCoreError as exc:
        raise PatchCoreError(f"{good}: need at least 2 good images to hold some out for testing") from exc
    train = [good_images[i] for i in keep]
    test = [Sample(good_images[i], 0, GOOD) for i in held_out]
    defective = Path(defective)
    for path in image_folder(defective).train:
        relative = path.relative_to(defective)
        defect_type = relative.parts[0] if len(relative.parts) > 1 else defective.name
        mask = _find_mask(Path(masks) / relative.parent, path.stem) if masks else None
        test.append(Sample(path, 1, defect_type, mask))
    if masks and not any(s.mask_path for s in test):
        raise PatchCoreError(f"{masks}: no mask matches a defective image (expected <name>.png or <name>_mask.png)")
    return Dataset(Path(good).name, train, test)


# (recognises the folder, opens it), tried in order; a folder none recognises is a plain folder of good images
LAYOUTS: list[tuple[Callable[[Path], bool], Callable[[Path], Dataset]]] = [
    (lambda root: (root.parent / VISA_SPLIT).is_file(), visa),
    (lambda root: (root / "train").is_dir() or (root / "test").is_dir(), mvtec),
]


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
        raise PatchCoreError(
            "the installed conformal-clip-data lacks images: reinstall it (pip install -U conformal-clip-data)"
        )
    test = [Sample(p, 0, GOOD) for p in nominal[TEXTILE_TEST_GOOD]]
    test += [Sample(p, 1, "local") for p in local[TEXTILE_TEST_DEFECT]]
    test += [Sample(p, 1, "global") for p in global_[TEXTILE_TEST_DEFECT]]
    return Dataset("textile", nominal[TEXTILE_TRAIN], test)
