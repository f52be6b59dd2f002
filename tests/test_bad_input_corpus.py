"""A corpus of bad input, generated here (no binaries committed): bad flags, config files, model files,
output paths and command lines, each given to the command line in-process. Every case must end in exit
code 1 or 2 with one ``patchcore: error:`` line on stderr and no traceback, and leave every file that was
on disk before as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from helpers import snapshot
from patchcore.cli import main
from patchcore.persistence.model_file import METADATA_KEY, checksum

SMALL = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.5"]

# Values no setting may take; each list is specific to its field (a value valid there is left out).
BAD_FLAG_VALUES = {
    "resize": ["nan", "abc", "8", "-1", "64.5", "100000"],
    "crop": ["abc", "8", "100000"],
    "tile_size": ["abc", "8", "1000000"],
    "tile_overlap": ["nan", "inf", "-0.1", "1", "abc"],
    "tile_scale": ["nan", "0", "-1", "17", "abc"],
    "patch_size": ["0", "2", "-3", "99", "abc"],
    "target_dim": ["0", "-5", "1000000", "abc"],
    "coreset_ratio": ["nan", "inf", "0", "-0.5", "1.5", "abc"],
    "coreset_size": ["0", "-1", "abc", "99999999999"],
    "projection_dim": ["0", "-1", "100000", "abc"],
    "exact_coreset_rows": ["-1", "abc", "1.5", "99999999999999"],
    "max_bank_memory": ["0", "-1", "abc", "99999999999"],
    "num_neighbors": ["0", "-1", "5000", "abc"],
    "k": ["0", "-1", "5000", "abc"],
    "image_top_k": ["0", "-1", "99999999", "abc"],
    "sigma": ["nan", "inf", "-1", "1e9", "abc", "9" * 400],
    "seed": ["-1", "abc", "1.5", "99999999999"],
    "threshold_fpr": ["nan", "0", "1", "-0.1", "abc"],
    "calibration_share": ["nan", "0", "1", "abc"],
    "threshold": ["nan", "inf", "0", "-1", "abc"],
    "pixel_threshold": ["nan", "inf", "0", "-1", "abc"],
    "scoring": ["max", ""],
    "normalization": ["none"],
    "coreset_method": ["kcenter"],
}
# Config-file values of the wrong type for each setting.
BAD_FILE_VALUES = {
    **{name: ["big", [1]] for name in BAD_FLAG_VALUES if name not in ("scoring", "normalization", "coreset_method")},
    "keep_aspect": ["false", 1, "yes"],
    "layers": [5, "", [1, 2], []],
    "backbone": [5, "no_such_net", True, [5]],
    "scoring": [3, "max"],
    "weights": [5],
    "colour": ["red"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Good images, a real model and an ensemble-free test category: what the bad cases are mixed into."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "good").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "good" / f"{i}.png")
    assert main(["fit", str(root / "good"), "-o", str(root / "model.safetensors"), *SMALL]) == 0
    return root


def bad_models(world: Path) -> dict[str, Path]:
    """Model files broken in every way we know, written next to the good one."""
    folder = world / "bad_models"
    if folder.exists():
        return {p.stem: p for p in folder.iterdir()}
    folder.mkdir()
    good = (world / "model.safetensors").read_bytes()
    from safetensors import safe_open

    with safe_open(str(world / "model.safetensors"), framework="numpy") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}

    def forged(**changes) -> None:  # an edited header with a recomputed checksum: only validation stops it
        name = changes.pop("_name")
        edited = {**header, **changes}
        edited["checksum"] = checksum(edited, tensors)
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={METADATA_KEY: json.dumps(edited)})

    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "text.safetensors").write_text("not a model\n")
    (folder / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[-7] ^= 0x10
    (folder / "bitflip.safetensors").write_bytes(bytes(flipped))
    save_file(tensors, str(folder / "no_header.safetensors"))
    save_file(tensors, str(folder / "header_not_json.safetensors"), metadata={METADATA_KEY: "{nope"})
    save_file(tensors, str(folder / "header_a_list.safetensors"), metadata={METADATA_KEY: "[1, 2]"})
    forged(_name="foreign_format", format="someone-elses-model")
    forged(_name="future_version", format_version=99)
    forged(_name="sigma_nan", config={**header["config"], "sigma": float("nan")})
    forged(_name="config_list", config=[1, 2])
    forged(_name="no_backbone", backbone=None)
    forged(_name="bad_thresholds", thresholds={"image": "high"})
    forged(_name="unknown_setting", config={**header["config"], "colour": "red"})
    forged(_name="wrong_layers", backbone={**header["backbone"], "layers": ["blocks.9"]})
    forged(_name="other_weights", backbone={**header["backbone"], "weights_sha256": "0" * 64})
    forged(_name="threshold_nan", thresholds={"image": float("nan"), "pixel": None, "method": "manual"})
    forged(_name="n_train_negative", train={**header["train"], "n_train": -5})
    forged(_name="n_train_text", train={**header["train"], "n_train": "7"})
    forged(_name="feature_shape_zero", train={**header["train"], "feature_shape": [-1, 0]})
    forged(_name="created_dict", created={"when": "now"})
    forged(_name="unknown_key", colour="red")
    forged(_name="train_paths_escape", train_paths=["../../etc/passwd"] * len(header["train_paths"]))
    for name, tensor, edit in (
        ("nan_bank", "memory_bank", lambda a: a.__setitem__((0, 0), np.nan)),
        ("bank_source_beyond_the_paths", "bank_source", lambda a: a.__setitem__((0, 0), 999)),
    ):
        changed = {**tensors, tensor: tensors[tensor].copy()}
        edit(changed[tensor])
        edited = {**header, "checksum": checksum(header, changed)}
        save_file(changed, str(folder / f"{name}.safetensors"), metadata={METADATA_KEY: json.dumps(edited)})
    return {p.stem: p for p in folder.iterdir()}


BAD_MODEL_NAMES = [
    "missing",
    "folder",
    "empty",
    "text",
    "random",
    "truncated",
    "bitflip",
    "no_header",
    "header_not_json",
    "header_a_list",
    "foreign_format",
    "future_version",
    "sigma_nan",
    "config_list",
    "no_backbone",
    "bad_thresholds",
    "unknown_setting",
    "wrong_layers",
    "other_weights",
    "threshold_nan",
    "n_train_negative",
    "n_train_text",
    "feature_shape_zero",
    "created_dict",
    "unknown_key",
    "nan_bank",
    "train_paths_escape",
    "bank_source_beyond_the_paths",
]


def model_path(world: Path, name: str) -> Path:
    if name == "missing":
        return world / "nothing_here.safetensors"
    if name == "folder":
        return world / "good"
    return bad_models(world)[name]


def commands_taking_a_model(world: Path, model: Path, out: Path) -> dict[str, list[str]]:
    image = str(world / "good" / "0.png")
    return {
        "predict": ["predict", str(model), image, "-o", str(out)],
        "info": ["info", str(model)],
        "calibrate": ["calibrate", str(model), "-o", str(out / "m.safetensors"), "--threshold", "1"],
        "fit_add": ["fit", str(world / "good"), "--add", str(model), "-o", str(out / "m.safetensors")],
        "evaluate": [
            "evaluate",
            "--good",
            str(world / "good"),
            "--defective",
            str(world / "good"),
            "-o",
            str(out),
            "--model",
            str(model),
        ],
    }


def check_fails_cleanly(argv: list[str], roots: list[Path], capsys) -> str:
    before = [snapshot(root) for root in roots]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (1, 2), f"{argv} exited {code}: {err}"
    lines = [line for line in err.splitlines() if line.startswith("patchcore: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in lines[0], err
    assert [snapshot(root) for root in roots] == before, f"{argv} changed files"
    return lines[0]


# ----------------------------------------------------------------------------- the corpus
@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in BAD_FLAG_VALUES.items() for v in values])
def test_bad_flag(world, tmp_path, capsys, field, value):
    flag = "--" + field.replace("_", "-")
    argv = ["fit", str(world / "good"), "-o", str(tmp_path / "m.safetensors"), *SMALL, f"{flag}={value}"]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize(
    ("field", "value", "suffix"),
    [(f, v, s) for f, values in BAD_FILE_VALUES.items() for v in values for s in (".yaml", ".json")],
)
def test_bad_config_file(world, tmp_path, capsys, field, value, suffix):
    config = tmp_path / f"settings{suffix}"
    config.write_text(json.dumps({field: value}))  # JSON is also YAML
    argv = ["fit", str(world / "good"), "-o", str(tmp_path / "m.safetensors"), "--config", str(config)]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize("text", ["resize: [", "- a\n- b", "resize: 64\n  crop: 3", "\t bad: yaml: :"])
def test_malformed_config_file(world, tmp_path, capsys, text):
    config = tmp_path / "settings.yaml"
    config.write_text(text)
    argv = ["fit", str(world / "good"), "-o", str(tmp_path / "m.safetensors"), "--config", str(config)]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize("command", ["predict", "info", "calibrate", "fit_add", "evaluate"])
@pytest.mark.parametrize("broken", BAD_MODEL_NAMES)
def test_bad_model_file(world, tmp_path, capsys, command, broken):
    model = model_path(world, broken)
    argv = commands_taking_a_model(world, model, tmp_path / "out")[command]
    check_fails_cleanly(argv, [world, tmp_path], capsys)
    assert not (tmp_path / "out" / "m.safetensors").exists()


@pytest.mark.parametrize("command", ["fit", "calibrate", "sign"])
@pytest.mark.parametrize("kind", ["folder", "unrelated file", "symlink", "fifo", "device"])
def test_model_output_that_is_not_a_model(world, tmp_path, capsys, monkeypatch, command, kind):
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
        (target / "keep.txt").write_text("keep")
    elif kind == "unrelated file":
        target.write_text("my notes")
    elif kind == "symlink":
        (tmp_path / "real.safetensors").write_bytes((world / "model.safetensors").read_bytes())
        target.symlink_to(tmp_path / "real.safetensors")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target = Path(os.devnull)
    monkeypatch.setenv("PATCHCORE_MODEL_KEY", "key")
    model = str(world / "model.safetensors")
    argv = {
        "fit": ["fit", str(world / "good"), "-o", str(target), *SMALL],
        "calibrate": ["calibrate", model, "-o", str(target), "--threshold", "1"],
        "sign": ["sign", model, "-o", str(target)],
    }[command]
    if command != "sign":
        monkeypatch.delenv("PATCHCORE_MODEL_KEY")
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("target", ["model", "image", "input folder", "file"])
def test_report_output_that_is_an_input_or_a_file(world, tmp_path, capsys, command, target):
    out = {
        "model": world / "model.safetensors",
        "image": world / "good" / "0.png",
        "input folder": world / "good",
        "file": tmp_path / "notes.txt",
    }[target]
    (tmp_path / "notes.txt").write_text("notes")
    model = str(world / "model.safetensors")
    argv = {
        "predict": ["predict", model, str(world / "good"), "-o", str(out)],
        "evaluate": [
            "evaluate",
            "--good",
            str(world / "good"),
            "--defective",
            str(world / "good"),
            "-o",
            str(out),
            "--model",
            model,
        ],
    }[command]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["fit"],
        ["fit", "DATA"],
        ["predict", "model.safetensors"],
        ["predict", "model.safetensors", "img.png"],
        ["fit", "DATA", "-o", "m", "--no-such-flag"],
        ["calibrate", "m", "-o", "m"],
        ["calibrate", "m", "-o", "m", "--fpr", "0.1", "--f1"],
        ["info"],
        ["evaluate", "-o", "out", "--batch-size", "many"],
    ],
)
def test_bad_command_line(tmp_path, capsys, argv):
    check_fails_cleanly(argv, [tmp_path], capsys)


@pytest.mark.parametrize(
    "extra",
    [
        ["--device", "banana"],
        ["--device", "cuda:9"],
        ["--device", "meta"],
        ["--device", "xpu"],
        ["--max-pixels", "-1"],
        ["--batch-size", "0"],
        ["--batch-size", "-4"],
        ["--search", "annoy"],
        ["--max-pixels", "abc"],
    ],
)
def test_bad_runtime_flag(world, tmp_path, capsys, extra):
    argv = ["predict", str(world / "model.safetensors"), str(world / "good"), "-o", str(tmp_path / "out"), *extra]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize("data", ["no/such/folder", "EMPTY", "FILE", "textile_typo"])
def test_bad_data(world, tmp_path, capsys, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    path = {"EMPTY": tmp_path / "empty", "FILE": tmp_path / "file.txt"}.get(data, tmp_path / data)
    check_fails_cleanly(["fit", str(path), "-o", str(tmp_path / "m.safetensors"), *SMALL], [world, tmp_path], capsys)


def test_config_file_that_is_not_utf8(world, tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_bytes(b"sigma: 4\n# caf\xe9\n")
    argv = ["fit", str(world / "good"), "-o", str(tmp_path / "m.safetensors"), "--config", str(config)]
    check_fails_cleanly(argv, [world, tmp_path], capsys)


@pytest.mark.parametrize("where", ["under a file", "in a read-only folder"])
def test_output_paths_that_cannot_be_written_are_found_before_any_work(world, tmp_path, capsys, where):
    if where == "under a file":
        (tmp_path / "afile").write_text("x")
        parent = tmp_path / "afile"
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
        if os.access(parent, os.W_OK):  # root ignores permissions: nothing to test
            pytest.skip("this user can write into read-only folders")
    model = str(world / "model.safetensors")
    for argv in (
        ["fit", str(world / "good"), "-o", str(parent / "m.safetensors"), *SMALL],
        ["predict", model, str(world / "good"), "-o", str(parent / "out")],
    ):
        check_fails_cleanly(argv, [world, tmp_path], capsys)


def test_outputs_that_would_replace_an_input_are_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    Image.open(world / "good" / "0.png").save(out / "overlays" / "a.png")
    argv = ["predict", str(world / "model.safetensors"), str(out / "overlays"), "-o", str(out), "--overlays"]
    check_fails_cleanly(argv, [world, tmp_path], capsys)
