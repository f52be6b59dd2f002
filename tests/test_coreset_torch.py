"""The greedy coreset in torch (the GPU's): the paper's selection, on the device that holds the bank.

Runs on the CPU here; tests/test_gpu.py runs it on a CUDA device when there is one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore.core import coreset_torch
from patchcore.core.coreset import greedy_coreset, greedy_coreset_reference
from patchcore.core.coreset_torch import greedy_coreset_torch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_selects_what_the_reference_selects(seed):
    x = np.random.default_rng(seed).standard_normal((2000, 64)).astype(np.float32)
    expected = greedy_coreset_reference(x, 200, projection_dim=32, seed=seed)
    np.testing.assert_array_equal(
        greedy_coreset_torch(torch.from_numpy(x), 200, projection_dim=32, seed=seed), expected
    )
    np.testing.assert_array_equal(greedy_coreset(x, 200, projection_dim=32, seed=seed), expected)


def test_blocks_of_rows_change_nothing(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((500, 16)).astype(np.float32))
    whole = greedy_coreset_torch(x, 60, projection_dim=8, seed=3)
    monkeypatch.setattr(coreset_torch, "BLOCK_ELEMENTS", 8 * 37)  # 37 rows at a time
    np.testing.assert_array_equal(greedy_coreset_torch(x, 60, projection_dim=8, seed=3), whole)


def test_a_generator_seed_is_advanced_like_the_numpy_versions():
    x = np.random.default_rng(5).standard_normal((300, 8)).astype(np.float32)
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    np.testing.assert_array_equal(
        greedy_coreset_torch(torch.from_numpy(x), 20, projection_dim=4, seed=a),
        greedy_coreset_reference(x, 20, projection_dim=4, seed=b),
    )
    assert a.integers(1 << 30) == b.integers(1 << 30)


def test_progress_reaches_the_total(monkeypatch):
    monkeypatch.setattr(coreset_torch, "PROGRESS_EVERY", 10)
    calls: list[int] = []
    greedy_coreset_torch(torch.randn(100, 4), 35, projection_dim=4, progress=calls.append)
    assert calls == [11, 21, 31, 35]


@pytest.mark.parametrize(
    "features,n_select,match",
    [
        (torch.zeros(5), 1, "(N, D)"),
        (np.zeros((5, 2), np.float32), 1, "torch tensor"),
        (torch.zeros(5, 2), 0, "n_select"),
        (torch.zeros(5, 2), 6, "n_select"),
        (torch.zeros(5, 2), True, "n_select"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, "NaN"),
    ],
)
def test_bad_input_says_what_to_do(features, n_select, match):
    with pytest.raises(ValueError, match=match):
        greedy_coreset_torch(features, n_select, projection_dim=2)  # type: ignore[arg-type]
