"""What several commands share: the model-setting flags (one per :class:`PatchCoreConfig` field), config
files, runtime flags, data arguments, and building or loading a detector from them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    COMBINES,
    CORESET_METHODS,
    GEOMETRY_FIELDS,
    MULTILEVEL_FIELDS,
    NORMALIZATIONS,
    PatchCoreConfig,
)
from ..core.scoring_modes import SCORING_MODES
from ..errors import PatchCoreError
from ..imaging.decode import DEFAULT_MAX_PIXELS
from ..search import SEARCH_BACKENDS

if TYPE_CHECKING:  # the detectors import torch: they load when a command needs one (see load_detector)
    from ..datasets import Dataset
    from ..detectors import Detector
    from ..detectors.base import Scorer

CHOICES = {
    "scoring": SCORING_MODES,
    "coreset_method": CORESET_METHODS,
    "normalization": NORMALIZATIONS,
    "combine": COMBINES,
}
# config fields a fit records rather than a user sets: stored in the model, no flag
LEARNED_FIELDS = ("geometry_reason",)
RESULT_KEYS = ("path", "score", "threshold", "is_anomalous", "normalized_score")
OVERLAY_HELP = (
    "heatmap overlay at the image's original size, colours fixed for the whole run (0.75 to 1.25 x the pixel "
    "threshold, for ensembles the threshold -/+ 2; without thresholds the run's smallest to largest map value), "
    "white outline where the map reaches "
    "the pixel threshold; "
    "and OUT/masks/<same name>.png, the binary mask at the model's pixel threshold (skipped with one warning "
    "when the model has none: fit with --threshold-fpr or --pixel-threshold)"
)


# the two pooling settings' help (both whole numbers N, an N x N average pool)
POOL_HELP = {
    "coarse_pool": "the coarse bank sees the model input average-pooled N x N (default: 1, the same scale; 2: half "
    "the resolution, for defects larger than a fine patch)",
    "input_pool": "average-pool the model input N x N before the backbone (features at 1/N resolution, maps at the "
    "input's size; default: 1)",
}


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PatchCoreConfig field; absent flags leave no attribute, so only given flags override."""
    group = parser.add_argument_group("model settings (saved in the model file)")
    group.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of settings (keys as the flags below); flags win"
    )
    hints = typing.get_type_hints(PatchCoreConfig)
    for field in dataclasses.fields(PatchCoreConfig):
        if field.name in LEARNED_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = str(hints[field.name])
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": f"default: {field.default}"}
        if field.name == "layers":
            kwargs.update(nargs="+", metavar="LAYER", help="feature layers, finest first (default: the backbone's)")
        elif field.name == "backbone":
            kwargs.update(
                nargs="+",
                metavar="NAME",
                help="backbone; several names fit an ensemble, one bank each (default: efficientnet_lite0)",
            )
        elif field.name == "level_sets":
            kwargs.update(
                nargs="+",
                metavar="A+B",
                help="multi-level: more layer sets, one bank each, e.g. blocks.2 blocks.2+blocks.4 (default: none)",
            )
        elif field.name == "scales":
            kwargs.update(
                nargs="+", type=int, metavar="PX", help="multi-level: more input sizes, each with every layer set"
            )
        elif field.name == "global_layers":
            kwargs.update(
                nargs="+",
                metavar="LAYER",
                help="multi-level: an image-level branch, a Gaussian of the images' mean features of these layers, "
                "for global texture changes, e.g. blocks.2 (default: none)",
            )
        elif field.name == "global_branch":
            kwargs.update(
                action=argparse.BooleanOptionalAction,
                help="an image-level branch beside the bank, a Gaussian of each image's mean patch feature, for "
                "global texture changes; holds calibration-share of the images out of the bank (default: on; "
                "--no-global-branch: the bank alone, the paper's method)",
            )
        elif field.name == "coarse_branch":
            kwargs.update(
                action=argparse.BooleanOptionalAction,
                help="a second bank of deeper features (coarse-layers, coarse-pool) averaged into the anomaly maps "
                "(image scores stay the bank's); put onto the bank's scale on the held-out images (default: on; "
                "--no-coarse-branch: the fine bank's maps alone)",
            )
        elif field.name == "coarse_layers":
            kwargs.update(
                nargs="+",
                metavar="LAYER",
                help="the coarse bank's layers (default: the backbone's coarse defaults, blocks.2 blocks.3 for "
                "efficientnet_lite0)",
            )
        elif field.name in POOL_HELP:
            kwargs.update(type=int, metavar="N", help=POOL_HELP[field.name])
        elif field.name == "image_top_k":
            kwargs.update(
                type=_optional_int,
                metavar="N",
                help="image score = mean of the N largest patch scores "
                "(default: the scoring mode's own, 20 for mean-top-k, 1 for paper and official)",
            )
        elif field.name in CHOICES:
            kwargs.update(choices=CHOICES[field.name])
        elif hints[field.name] is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif "None" in hint and "int" in hint:
            kwargs.update(type=_optional_int, metavar="N|none")
        elif "int" in hint:
            kwargs.update(type=int)
        elif "float" in hint:
            kwargs.update(type=float)
        group.add_argument(flag, **kwargs)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(PatchCoreConfig) if hasattr(args, f.name)}


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a YAML or JSON file whose keys are PatchCoreConfig fields (or their flag spellings)."""
    file = Path(path)
    if not file.is_file():
        raise PatchCoreError(f"{file}: no such config file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PatchCoreError(f"{file}: not UTF-8 text: save the config file as UTF-8") from None
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        what = "JSON" if file.suffix.lower() == ".json" else "YAML"
        raise PatchCoreError(f"{file}: not valid {what} ({' '.join(str(exc).split())})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PatchCoreError(f"{file}: expected a mapping of settings, e.g. 'coreset_ratio: 0.1'")
    settings = {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}
    for name in ("layers", "coarse_layers"):
        if isinstance(settings.get(name), str):
            settings[name] = settings[name].split()
    return settings


def make_detector(args: argparse.Namespace, train: Sequence[Any] | None = None) -> Detector:
    """Defaults, then the --config file, then the flags given on the command line: a PatchCore model, a
    multi-level one when the settings ask for it, or an ensemble when several backbones are named (one config
    per backbone; the calibration share, seed and threshold settings are the ensemble's, its thresholds in
    standard deviations). With ``train`` (the training images) and ``auto_geometry`` on, the input geometry
    not fixed by the settings is chosen from the images (:func:`patchcore.imaging.auto_geometry.adapt_geometry`)."""
    from ..detectors import PatchCore, PatchCoreEnsemble

    settings = {**(read_config_file(args.config) if getattr(args, "config", None) else {}), **given_settings(args)}
    if "geometry_reason" in settings:
        raise PatchCoreError("geometry_reason is recorded by fit, not set: drop it from the config file")
    if train is not None and settings.get("auto_geometry", PatchCoreConfig.auto_geometry):
        from ..imaging.auto_geometry import adapt_geometry

        base = PatchCoreConfig.from_dict({k: v for k, v in settings.items() if k != "backbone"})
        chosen = adapt_geometry(base, train, given=settings)
        settings.update({name: getattr(chosen, name) for name in (*GEOMETRY_FIELDS, "geometry_reason")})
    backbones = settings.pop("backbone", None) or [PatchCoreConfig.backbone]
    backbones = [backbones] if isinstance(backbones, str) else backbones
    if not isinstance(backbones, list) or not all(isinstance(name, str) for name in backbones):
        raise PatchCoreError(f"backbone={backbones!r} must be a backbone name or a list of names")
    if len(backbones) == 1:
        config = PatchCoreConfig.from_dict({**settings, "backbone": backbones[0]})
        if config.multilevel:
            from ..detectors import MultiLevelPatchCore

            return MultiLevelPatchCore(config, **runtime_from_args(args))
        return PatchCore(config, **runtime_from_args(args))
    if any(settings.get(name) is not None for name in MULTILEVEL_FIELDS):
        raise PatchCoreError("several backbones and multi-level settings do not combine: choose one backbone")
    if settings.get("coarse_layers"):
        raise PatchCoreError("--coarse-layers cannot apply to several backbones: drop it to use each one's defaults")
    if settings.get("layers"):
        raise PatchCoreError("--layers cannot apply to several backbones: drop it to use each backbone's defaults")
    thresholds = {
        name: settings.pop(name) for name in ("threshold_fpr", "threshold", "pixel_threshold") if name in settings
    }
    configs = [PatchCoreConfig.from_dict({**settings, "backbone": name}) for name in backbones]
    first = configs[0]
    return PatchCoreEnsemble(
        configs, calibration_share=first.calibration_share, seed=first.seed, **thresholds, **runtime_from_args(args)
    )


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime (never changes results)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images processed together (default: 32; on a CPU the backbone runs them in slices of ~200k pixels)",
    )
    group.add_argument(
        "--search",
        choices=SEARCH_BACKENDS,
        default="exact",
        help="nearest-neighbour backend (default: exact, through a bf16 shortlist where the CPU has native bf16; "
        "exact-fp32: plain fp32 GEMM; faiss-* need pip install 'patchcore[faiss]'; ivf/hnsw are approximate)",
    )
    group.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse image files of more pixels, e.g. decompression bombs (default: {DEFAULT_MAX_PIXELS:,})",
    )


def runtime_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "search": args.search,
        "progress": True,
        "max_pixels": args.max_pixels,
    }


def load_detector(path: str, args: argparse.Namespace) -> Detector:
    """The detector in a model file, with the runtime flags."""
    from ..detectors import load

    return load(path, **runtime_from_args(args))


def load_scorer(path: str, args: argparse.Namespace) -> Scorer:
    """What scores images: an exported ``.onnx`` on the torch-free runtime, else the model file's detector."""
    if Path(path).suffix.lower() != ".onnx":
        return load_detector(path, args)
    from ..runtime import OnnxDetector

    for flag, value, default in (("--device", args.device, "cpu"), ("--search", args.search, "exact")):
        if value != default:
            raise PatchCoreError(f"{flag} does not apply to an .onnx model (ONNX Runtime on the CPU, exact search)")
    return OnnxDetector.load(path, batch_size=args.batch_size, max_pixels=args.max_pixels)


def refuse_model_settings(args: argparse.Namespace, why: str) -> None:
    """Commands that take a fitted model keep its settings: refuse model-setting flags with ``why``."""
    if given_settings(args) or getattr(args, "config", None):
        raise PatchCoreError(f"{why}: drop the model settings flags")


def add_folder_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plain folders (instead of DATA)")
    group.add_argument(
        "--good", metavar="DIR", help="good images; with --defective a seeded 20%% are held out for testing"
    )
    group.add_argument("--defective", metavar="DIR", help="defective images (sub-folders become defect types)")
    group.add_argument(
        "--masks", metavar="DIR", help="masks named like the defective images (<name>.png or <name>_mask.png)"
    )


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    from ..datasets import folders, open_dataset

    if args.good:
        if args.data:
            raise PatchCoreError("give either DATA or --good DIR, not both")
        return folders(args.good, args.defective, args.masks, seed=getattr(args, "seed", 0))
    if args.defective or args.masks:
        raise PatchCoreError("--defective and --masks need --good DIR")
    if not args.data:
        raise PatchCoreError("name the data: DATA (a folder or 'textile') or --good DIR")
    return open_dataset(args.data)


def check_output_folder(out: Path, protected: list[Path]) -> None:
    """OUT must be a folder, or creatable as one, and must not be the model or an input (before any work)."""
    if out.exists() and not out.is_dir():
        raise PatchCoreError(f"{out}: exists and is not a folder: -o names the output folder, e.g. runs/predict")
    check_writable(out)
    for path in protected:
        if path.exists() and path.resolve() == out.resolve():
            raise PatchCoreError(
                f"{out}: is also an input or the model: choose another output folder, e.g. runs/predict"
            )


def check_planned_outputs(planned: list[Path], protected: list[Path]) -> None:
    """Refuse a run whose outputs would replace one of its inputs or the model (say OUT/overlays/a.png when
    OUT/overlays/ is also an input folder)."""
    existing = {path.resolve() for path in protected if path.exists()}
    for path in planned:
        if path.exists() and path.resolve() in existing:
            raise PatchCoreError(f"{path}: would be written over an input or the model: choose another output folder")


def check_writable(path: Path) -> None:
    """The nearest existing folder at or above ``path`` must be a folder this process can write into."""
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path != parent and not parent.is_dir():
        raise PatchCoreError(f"{path}: {parent} is a file, not a folder: choose another path")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise PatchCoreError(f"{path}: cannot write into {parent} (permission denied): choose another path")
