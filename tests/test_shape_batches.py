"""Batches of inputs of mixed shapes (keep_aspect without crop, tiles): one search per batch, and the same
scores, maps and bank whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore import PatchCore, PatchCoreError
from patchcore.detectors.feature_batches import FeatureBatch, batch_maps, extract_batch, group_by_shape, take_batches
from patchcore.imaging import Geometry
from synthetic import SMALL

ASPECT = {**SMALL, "keep_aspect": True, "crop": None}
SHAPES = [(40, 88), (52, 30), (40, 88), (64, 48), (33, 71), (52, 30), (45, 45)]  # (H, W); some repeat


def fabric(rng: np.random.Generator, height: int, width: int, blob: tuple[int, int] | None = None) -> np.ndarray:
    """Striped fabric at any (H, W); ``blob`` = top-left of an 8 x 8 red defect."""
    x = np.mgrid[:height, :width][1]
    base = 120 + 60 * np.sin(x / 2.0) + rng.normal(0, 8, (height, width))
    image = np.stack([base, base * 0.9, base * 0.8], axis=-1)
    if blob is not None:
        image[blob[0] : blob[0] + 8, blob[1] : blob[1] + 8] = [255, 20, 20]
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(5)
    train = [fabric(rng, h, w) for h, w in SHAPES]
    test = [fabric(rng, h, w, blob=(10, 12) if i % 3 == 1 else None) for i, (h, w) in enumerate(SHAPES)]
    return train, test


class CountingIndex:
    """Wraps a search index and records the number of queries of every call."""

    def __init__(self, index) -> None:
        self.index, self.bank, self.calls = index, index.bank, []

    def search(self, queries: torch.Tensor, k: int = 1):
        self.calls.append(int(queries.shape[0]))
        return self.index.search(queries, k)


# ------------------------------------------------------------------ the pure parts
def test_groups_keep_first_appearance_order():
    assert group_by_shape([(3, 4, 5), (3, 4, 5), (3, 5, 4)]) == [[0, 1], [2]]
    assert group_by_shape([]) == []


def test_batches_respect_count_and_size_and_keep_order():
    sizes = [4, 4, 9, 1, 1, 1, 1, 1, 3]
    batches = list(take_batches(range(len(sizes)), lambda i: sizes[i], max_items=4, max_size=8))
    assert [i for batch in batches for i in batch] == list(range(len(sizes)))
    assert batches == [[0, 1], [2], [3, 4, 5, 6], [7, 8]]
    with pytest.raises(ValueError):
        next(take_batches([1], lambda i: 1, max_items=0, max_size=1))


def test_extract_batch_runs_once_per_shape_and_keeps_input_order():
    calls = []

    def extract(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, H/2, W/2, 2): the mean pixel, twice
        calls.append(tuple(x.shape))
        pooled = torch.nn.functional.avg_pool2d(x, 2).mean(dim=1)
        return torch.stack([pooled, -pooled], dim=-1)

    inputs = [torch.full((3, h, w), float(i)) for i, (h, w) in enumerate([(4, 6), (2, 2), (4, 6), (6, 2)])]
    owners = [(Geometry((h, w), 8, None), True) for h, w in [(4, 6), (2, 2), (4, 6), (6, 2)]]
    batch = extract_batch(inputs, owners, extract)
    assert calls == [(2, 3, 4, 6), (1, 3, 2, 2), (1, 3, 6, 2)]
    assert batch.grids == ((2, 3), (1, 1), (2, 3), (3, 1)) and batch.bounds == [0, 6, 7, 13, 16]
    assert batch.input_shapes == ((4, 6), (2, 2), (4, 6), (6, 2))
    for i, part in enumerate(batch.split(batch.rows)):
        assert torch.equal(part[:, 0], torch.full((part.shape[0],), float(i)))
    maps = batch_maps(batch.rows[:, 0].contiguous(), batch, sigma=1.0)
    assert [m.shape for m in maps] == [(4, 6), (2, 2), (4, 6), (6, 2)]
    assert all(np.allclose(m, i) for i, m in enumerate(maps))  # constant grids stay constant
    single = extract_batch(inputs[:1], owners[:1], extract)
    assert isinstance(single, FeatureBatch) and single.rows.shape == (6, 2)


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize(
    "settings",
    [{"keep_aspect": True, "crop": None}, {"tile_size": 40, "keep_aspect": True, "crop": None}, {"tile_size": 40}],
    ids=["keep-aspect", "tiles-keep-aspect", "tiles"],
)
def test_scores_maps_and_bank_do_not_depend_on_the_batching(images, settings):
    train, test = images
    one = PatchCore(**{**SMALL, **settings}, batch_size=1).fit(train)
    many = PatchCore(**{**SMALL, **settings}, batch_size=16).fit(train)
    np.testing.assert_allclose(many.memory_bank_.numpy(), one.memory_bank_.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(many.bank_source_, one.bank_source_)
    mixed, alone = many.predict(test), one.predict(test)
    for a, b, image in zip(mixed, alone, test):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        assert a.anomaly_map.shape == image.shape[:2]
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-5)
    # an image's score does not depend on its neighbours in the batch
    shuffled = [4, 0, 6, 2, 1, 5, 3]
    again = many.score_samples([test[i] for i in shuffled])
    np.testing.assert_allclose(again, [mixed[i].score for i in shuffled], rtol=1e-5)


def test_a_batch_of_mixed_shapes_is_searched_in_one_call(images):
    train, test = images
    model = PatchCore(**ASPECT, batch_size=32).fit(train)
    counting = model._index = CountingIndex(model._index)
    model.score_samples(test)
    patches = sum(h * w for h, w, _ in (model.extract_features([image])[0].shape for image in test))
    # one call for every patch of the batch, then eq. 7's support searches: one row per image, one call per
    # group of images sharing a feature grid
    grids = {model.extract_features([image])[0].shape[:2] for image in test}
    assert counting.calls[0] == patches and sum(counting.calls[1:]) == len(test)
    assert len(counting.calls[1:]) == len(grids)


def test_the_pixel_budget_splits_batches_of_large_inputs(images):
    train, test = images
    model = PatchCore(**ASPECT, batch_size=2).fit(train)
    counting = model._index = CountingIndex(model._index)
    model.score_samples(test[:2])  # 64 x 141 and 118 x 64 inputs: over two 56 x 56 squares each
    assert [c for c in counting.calls if c > 1] == [8 * 18, 14 * 8]


def test_bank_rows_of_mixed_shapes_record_their_image_and_cell(images):
    train, _ = images
    model = PatchCore(**{**ASPECT, "coreset_ratio": 0.5}).fit(train)
    grids = [model.extract_features([image])[0] for image in train]
    bank, source = model.memory_bank_.numpy(), model.bank_source_
    assert source is not None
    for row, (image, tile, r, c, *_box) in zip(bank, source):
        assert tile == 0
        np.testing.assert_allclose(row, grids[image][r, c], rtol=1e-4, atol=1e-4)


def test_extract_features_of_mixed_shapes_says_what_to_do(images):
    train, _ = images
    model = PatchCore(**ASPECT).fit(train[:2])
    with pytest.raises(PatchCoreError, match="one image at a time"):
        model.extract_features(train[:2])
    assert model.extract_features([train[0], train[2]]).shape[0] == 2  # one shape: stacked as before
