"""The Ray engine (``--engine ray``) on Ray local: 2 CPUs, a small object store, one session for the module.

The Ray workers run torch on one thread each (Ray sets OMP_NUM_THREADS to an actor's CPUs); float32 sums
in torch depend on the thread count at the 1e-6 level, in the local engine too, so the local references here
run on one thread as well and the outputs must then be equal (scores within 1e-6, files byte for byte).
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore import PatchCore
from patchcore.cli import main
from patchcore.detectors import PatchCoreEnsemble, load
from patchcore.reporting.files import output_names
from synthetic import SMALL, make_mvtec, texture

ray = pytest.importorskip("ray")
from patchcore.engines import ray_engine  # noqa: E402  (after the skip: needs ray)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scores(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row["score"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_mvtec(tmp_path_factory.mktemp("ray") / "category", n_train=6, n_good=3, n_bad=3)
    (root / "test" / "blob" / "broken.png").write_bytes(b"not an image")
    wide = np.concatenate([texture(np.random.default_rng(5), 48)] * 2, axis=1)  # 48 x 96: tiles and aspect
    from PIL import Image

    Image.fromarray(wide).save(root / "test" / "good" / "wide.png")
    return root


def predict_both(model: Path, data: Path, tmp_path: Path, *flags: str) -> tuple[Path, Path, int, int]:
    local, remote = tmp_path / "local", tmp_path / "ray"
    with one_thread():
        code_local = main(["predict", str(model), str(data / "test"), "-o", str(local), *flags])
    code_ray = main(["predict", str(model), str(data / "test"), "-o", str(remote), *flags, "--engine", "ray"])
    return local, remote, code_local, code_ray


def assert_same_outputs(local: Path, remote: Path) -> None:
    expected, got = scores(local / "scores.csv"), scores(remote / "scores.csv")
    assert list(got) == list(expected)  # the same rows in input order
    for path, score in expected.items():
        assert (score == got[path] == "") or abs(float(score) - float(got[path])) <= 1e-6, path
    assert tree(remote) == tree(local)  # csv, jsonl, maps, overlays, masks: byte for byte


def test_predict_on_ray_writes_what_the_local_engine_writes(data, tmp_path):
    model = tmp_path / "model.safetensors"
    settings = ["--resize", "64", "--crop", "56", "--coreset-ratio", "0.25", "--threshold-fpr", "0.2"]
    assert main(["fit", str(data), "-o", str(model), *settings]) == 0
    local, remote, code_local, code_ray = predict_both(model, data, tmp_path, "--maps", "--overlays")
    assert code_local == code_ray == 3  # the unreadable image: an error row and exit code 3, on both engines
    assert_same_outputs(local, remote)
    assert (remote / "masks" / "blob" / "000.png").is_file() and (remote / "maps" / "good" / "wide.npy").is_file()


def test_predict_on_ray_with_an_ensemble_of_tiles(data, tmp_path):
    """An ensemble (no thresholds: overlays coloured by the run's range) with tiles and non-square images."""
    model = tmp_path / "ensemble.safetensors"
    settings = ["--backbone", "efficientnet_lite0", "efficientnet_lite1", "--resize", "32", "--tile-size", "32"]
    assert main(["fit", str(data), "-o", str(model), *settings, "--coreset-ratio", "0.25"]) == 0
    local, remote, code_local, code_ray = predict_both(model, data, tmp_path, "--maps", "--overlays")
    assert code_local == code_ray == 3
    assert_same_outputs(local, remote)


def test_a_worker_that_dies_is_replaced_and_the_output_is_complete(tmp_path, fitted_small):
    model, inputs = fitted_small
    marker = str(tmp_path / "died")

    class DiesOnce(ray_engine.RayScorer):
        """A scoring actor whose process dies on its first batch, once per run (the marker file says it did)."""

        def __call__(self, batch):
            if not os.path.exists(marker):
                Path(marker).write_text("died")
                os._exit(1)
            return super().__call__(batch)

    names = output_names([Path(p.name) for p in inputs])
    expected, got = tmp_path / "expected", tmp_path / "got"
    keys = ("path", "score", "threshold", "is_anomalous", "normalized_score")
    detector = load(model)
    common = {"runtime": {"progress": False, "batch_size": 2}, "maps": True, "num_workers": 2}
    common["on_error"] = lambda message: None
    ray_engine.predict(detector, model.read_bytes(), inputs, names, expected, keys, **common)
    written, failed = ray_engine.predict(
        detector, model.read_bytes(), inputs, names, got, keys, **common, scorer=DiesOnce
    )
    assert Path(marker).exists()  # a worker did die
    assert (written, failed) == (len(inputs), 1)
    assert tree(got) == tree(expected)


@pytest.fixture(scope="module")
def fitted_small(data, tmp_path_factory) -> tuple[Path, list[Path]]:
    model = tmp_path_factory.mktemp("small") / "model.safetensors"
    rng = np.random.default_rng(0)
    PatchCore(**SMALL).fit([texture(rng) for _ in range(4)]).save(model)
    return model, sorted((data / "test").rglob("*.png"))


def test_fit_on_ray_in_one_shard_equals_the_local_fit(rng_images):
    with one_thread():
        local = PatchCore(**SMALL).fit(rng_images)
        on_ray = ray_engine.fit(PatchCore(**SMALL), rng_images, shards=1)
        assert on_ray.memory_bank_size == local.memory_bank_size and on_ray.n_train_ == local.n_train_
        np.testing.assert_allclose(on_ray.score_samples(rng_images), local.score_samples(rng_images), atol=1e-6)


def test_fit_on_ray_in_shards_is_deterministic_covers_like_one_greedy_and_takes_add(rng_images, tmp_path):
    settings = {**SMALL, "coreset_ratio": 0.1, "threshold_fpr": 0.2}
    first = ray_engine.fit(PatchCore(**settings), rng_images, shards=2)
    again = ray_engine.fit(PatchCore(**settings), rng_images, shards=2, num_workers=1)
    assert np.array_equal(first.memory_bank_.numpy(), again.memory_bank_.numpy())
    assert first.thresholds_ == again.thresholds_ and first.thresholds_.image is not None
    local = PatchCore(**settings).fit(rng_images)
    assert first.memory_bank_size == local.memory_bank_size
    train, _ = local.calibration_split(rng_images)
    features = torch.from_numpy(local.extract_features(train).reshape(-1, local.memory_bank_.shape[1]))

    def radius(model: PatchCore) -> float:
        return float(torch.cdist(features, model.memory_bank_).min(dim=1).values.max())

    assert radius(first) <= 1.25 * radius(local)
    first.save(tmp_path / "model.safetensors")
    model = load(tmp_path / "model.safetensors").partial_fit(rng_images[:2])  # fit --add
    assert model.n_train_ == first.n_train_ + 2 and model.memory_bank_size > first.memory_bank_size


def test_fit_on_ray_fits_ensembles_from_the_command_line_and_add_extends_them(data, tmp_path):
    model, added = tmp_path / "ensemble.safetensors", tmp_path / "added.safetensors"
    settings = ["--backbone", "efficientnet_lite0", "efficientnet_lite1", "--resize", "32", "--keep-aspect"]
    assert main(["fit", str(data), "-o", str(model), *settings, "--engine", "ray", "--shards", "2"]) == 0
    assert main(["fit", str(data / "test" / "good"), "--add", str(model), "-o", str(added)]) == 0
    ensemble = load(added)
    assert isinstance(ensemble, PatchCoreEnsemble) and ensemble.n_train_ == load(model).n_train_ + 4
    assert np.isfinite(ensemble.score_samples(sorted((data / "test" / "good").glob("*.png")))).all()


def test_ray_flags_need_the_ray_engine(data, tmp_path, capsys):
    assert main(["predict", "m.safetensors", str(data), "-o", str(tmp_path / "o"), "--num-workers", "2"]) == 1
    assert "--num-workers need --engine ray" in capsys.readouterr().err


def test_a_fit_shard_whose_worker_dies_is_retried(rng_images, tmp_path):
    marker = str(tmp_path / "died")

    def dies_once(detector, images, n_shards):
        if not os.path.exists(marker):
            Path(marker).write_text("died")
            os._exit(1)
        return detector.fit_shard(images, n_shards)

    expected = ray_engine.fit(PatchCore(**SMALL), rng_images, shards=2)
    got = ray_engine.fit(PatchCore(**SMALL), rng_images, shards=2, shard_task=dies_once)
    assert Path(marker).exists()
    assert np.array_equal(got.memory_bank_.numpy(), expected.memory_bank_.numpy())
