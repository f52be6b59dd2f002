"""Bad input, as a hostile but fair user would give it: every case ends in one clear line (or an error row),
and nothing that was on disk before is overwritten or lost."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli, snapshot
from patchcore import PatchCoreError
from patchcore.imaging import load_image
from patchcore.persistence.atomic import atomic_write

FAST = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.5"]


def one_line_error(result) -> str:
    assert result.stderr.startswith("patchcore: error: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def model(good, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    result = run_cli("fit", good, "-o", path, *FAST)
    assert result.returncode == 0, result.stderr
    return path


# ----------------------------------------------------------------------------- images as the user sees them
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    seen = load_image(tmp_path / "r.jpg")
    assert seen.shape == (40, 20, 3)  # as a viewer shows it
    assert seen[:20].mean() > 0.9 and seen[20:].mean() < 0.1  # the white half is now on top


def test_float_images_keep_their_values_and_out_of_range_ones_are_refused(tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, np.float32), mode="F").save(tmp_path / "half.tif")
    assert load_image(tmp_path / "half.tif") == pytest.approx(0.5)
    Image.fromarray(np.full((16, 16), 300.0, np.float32), mode="F").save(tmp_path / "big.tif")
    with pytest.raises(PatchCoreError, match=r"\[300, 300\]: scale it first"):
        load_image(tmp_path / "big.tif")


def test_sixteen_bit_images_are_scaled_by_65535_whatever_their_content(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark.png")
    assert load_image(tmp_path / "dark.png") == pytest.approx(200 / 65535)


def test_files_of_several_frames_are_refused(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(PatchCoreError, match="2 frames"):
        load_image(tmp_path / "anim.gif")


def test_decompression_bombs_and_the_pixel_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    with pytest.raises(PatchCoreError, match="max-pixels"):
        load_image(tmp_path / "bomb.png")
    Image.new("RGB", (30, 30)).save(tmp_path / "small.png")
    with pytest.raises(PatchCoreError, match="more than the limit of 800"):
        load_image(tmp_path / "small.png", max_pixels=800)


def test_predict_turns_bad_images_into_error_rows(model, good, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bomb.png").write_bytes(png_claiming(20000, 20000))
    Image.open(next(good.iterdir())).save(inputs / "fine.png")
    out = tmp_path / "out"
    result = run_cli("predict", model, inputs, "-o", out)
    assert result.returncode == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["bomb.png", "fine.png"]
    assert "max-pixels" in rows[0]["error"] and rows[1]["score"] > 0


# ----------------------------------------------------------------------------- nothing overwritten
def test_predict_refuses_an_output_that_is_the_model_an_input_or_a_file(model, good, tmp_path):
    image = next(iter(sorted(good.iterdir())))
    for out in (model, image, good):
        before = snapshot(model.parent) | snapshot(good)
        result = run_cli("predict", model, good, "-o", out)
        assert result.returncode == 1, out
        one_line_error(result)
        assert snapshot(model.parent) | snapshot(good) == before


def test_inputs_that_share_a_name_keep_their_extensions(model, good, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = Image.open(next(iter(sorted(good.iterdir()))))
    source.save(inputs / "a.png")
    source.save(inputs / "a.jpg")
    out = tmp_path / "out"
    result = run_cli("predict", model, inputs, "-o", out, "--maps", "--overlays")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["a.jpg.npy", "a.png.npy"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.jpg.png", "a.png.png"]
    assert "shares its name" in result.stderr


def test_model_files_get_the_umask_mode_and_killed_saves_are_cleaned_up(tmp_path):
    dead = tmp_path / ".m.bin.999999999.abc.tmp"
    dead.write_bytes(b"half a model")
    alive = tmp_path / f".m.bin.{os.getpid()}.xyz.tmp"
    alive.write_bytes(b"a save in progress")
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "m.bin", lambda tmp: Path(tmp).write_bytes(b"model"))
    finally:
        os.umask(previous)
    assert (tmp_path / "m.bin").read_bytes() == b"model"
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o644
    assert not dead.exists() and alive.exists()


# ----------------------------------------------------------------------------- no run lost to one input
def test_any_file_name_survives_csv_and_jsonl(model, good, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = Image.open(next(iter(sorted(good.iterdir()))))
    source.save(os.path.join(os.fsencode(inputs), b"caf\xe9.png"))  # Latin-1, not UTF-8
    source.save(inputs / "=HYPERLINK(1).png")
    out = tmp_path / "out"
    result = run_cli("predict", model, ".", "-o", out, cwd=inputs)  # paths relative to "in": cells start with "="
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["score"] > 0 for r in rows) and rows[0]["path"] == "=HYPERLINK(1).png"
    cells = (out / "scores.csv").read_bytes().splitlines()
    assert any(b"caf\xe9.png" in line for line in cells)  # the name's own bytes
    assert any(line.startswith(b"'") and b"=HYPERLINK" in line for line in cells)  # not a formula


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["fit"], "required"),
        (["predict", "m.safetensors"], "required"),
        (["fit", "DATA", "-o", "m.safetensors", "--coreset-ratio", "lots"], "invalid float value"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argparse_errors_are_one_line(args, words):
    result = run_cli(*args)
    assert result.returncode == 2 and words in one_line_error(result) and "--help" in result.stderr


@pytest.mark.parametrize(("device", "words"), [("banana", "not a torch device"), ("cuda:7", "cuda")])
def test_devices_that_do_not_exist_are_one_line(good, tmp_path, device, words):
    result = run_cli("fit", good, "-o", tmp_path / "m.safetensors", *FAST, "--device", device)
    assert result.returncode == 1 and words in one_line_error(result)
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- integrity
def test_a_keyed_signature_refuses_forged_and_unsigned_models(fitted, tmp_path, monkeypatch):
    import patchcore
    from patchcore.persistence import read_header

    unsigned = tmp_path / "unsigned.safetensors"
    fitted.save(unsigned)
    monkeypatch.setenv("PATCHCORE_MODEL_KEY", "site secret")
    signed = tmp_path / "signed.safetensors"
    fitted.save(signed)
    assert "signature" in read_header(signed) and "signature" not in read_header(unsigned)
    assert patchcore.load(signed).memory_bank_size == fitted.memory_bank_size
    with pytest.raises(PatchCoreError, match="unsigned model"):
        patchcore.load(unsigned)
    monkeypatch.setenv("PATCHCORE_MODEL_KEY", "another key")
    with pytest.raises(PatchCoreError, match="forged or foreign"):
        patchcore.load(signed)
    monkeypatch.delenv("PATCHCORE_MODEL_KEY")
    assert patchcore.load(signed).memory_bank_size == fitted.memory_bank_size  # without a key: checksum only


def test_sign_command_and_info_verify(model, tmp_path, monkeypatch):
    signed = tmp_path / "signed.safetensors"
    monkeypatch.setenv("PATCHCORE_MODEL_KEY", "site secret")
    assert run_cli("info", model).returncode == 1  # unsigned: refused where a key is set
    result = run_cli("sign", model, "-o", signed)
    assert result.returncode == 0, result.stderr
    assert json.loads(run_cli("info", signed).stdout)["signature"]
    data = bytearray(signed.read_bytes())
    data[-3] ^= 0x01  # one bit of the bank
    signed.write_bytes(bytes(data))
    monkeypatch.delenv("PATCHCORE_MODEL_KEY")
    assert "checksum mismatch" in one_line_error(run_cli("info", signed))


def test_pictures_of_huge_images_are_drawn_scaled_down(fitted, monkeypatch):
    from patchcore.reporting import overlays

    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    result = next(fitted.infer([image]))
    monkeypatch.setattr(overlays, "MAX_PICTURE_PIXELS", 12 * 16)
    pixels, full, overlay = overlays.render_overlay(image, result.map(), result.geometry, (0.0, 1.0), None)
    assert pixels.shape == (12, 16, 3) and full.shape == (12, 16) and overlay.shape == (12, 16, 3)
