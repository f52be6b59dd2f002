"""Shared fixtures (see synthetic.py for the images they are made of)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchcore import PatchCore
from synthetic import SMALL, make_mvtec, texture

collect_ignore = ["golden"]  # model files and the script that wrote them once, not tests


@pytest.fixture(scope="session")
def rng_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [texture(rng) for _ in range(6)]


@pytest.fixture
def mvtec_dir(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "category")


@pytest.fixture(scope="session")
def fitted(rng_images) -> PatchCore:
    """A small real model: EfficientNet-Lite0 with its shipped weights, 64 px input."""
    return PatchCore(**SMALL).fit(rng_images)
