"""Config validation: every setting is checked for type, finiteness and range when a config is built, from
flags, config files and model headers alike (one PatchCoreError naming the field, never a traceback)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_cli
from patchcore import PatchCoreConfig, PatchCoreError

FIELDS = [f.name for f in dataclasses.fields(PatchCoreConfig)]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3),
    st.sampled_from(["paper", "official", "mean-top-k", "greedy", "random", "backbone", "imagenet", "blocks.2"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4))
def test_any_settings_give_a_valid_config_or_one_clear_error(data):
    try:
        config = PatchCoreConfig.from_dict(data)
    except PatchCoreError as exc:
        assert "\n" not in str(exc)
        return
    document = json.loads(json.dumps(config.to_dict(), allow_nan=False))  # plain, finite JSON
    assert PatchCoreConfig.from_dict(document) == config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sigma": float("nan")}, "sigma=nan must be a finite number"),
        ({"sigma": float("inf")}, "finite"),
        ({"sigma": 1e9}, "too large"),
        ({"keep_aspect": "false"}, "keep_aspect='false' must be true or false"),
        ({"resize": "big"}, "whole number"),
        ({"resize": 64.5}, "whole number"),
        ({"resize": 100000}, "too large"),
        ({"coreset_ratio": "0.1"}, "must be a number"),
        ({"layers": 5}, "list of layer names"),
        ({"layers": "blocks.2"}, "list of layer names"),
        ({"seed": -1}, "non-negative"),
        ({"scoring": "max"}, "not one of"),
        ({"colour": "red"}, "unknown setting"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(settings, message):
    with pytest.raises(PatchCoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PatchCoreConfig.from_dict(settings)


def test_numpy_scalars_become_plain_python_values():
    config = PatchCoreConfig(seed=np.int64(3), coreset_ratio=np.float32(0.5), keep_aspect=np.bool_(True))
    assert (type(config.seed), type(config.coreset_ratio), type(config.keep_aspect)) == (int, float, bool)
    json.dumps(config.to_dict())


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--sigma", "nan"], "sigma"),
        (["--sigma", "1e9"], "sigma"),
        (["--resize", "100000"], "resize"),
        (["--config", "CONFIG"], "keep_aspect"),
    ],
)
def test_the_command_line_refuses_bad_settings_before_any_work(tmp_path, args, field):
    from PIL import Image

    data = tmp_path / "good"
    data.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "a.png")
    config = tmp_path / "settings.yaml"
    config.write_text('keep_aspect: "false"\n')
    model = tmp_path / "model.safetensors"
    result = run_cli("fit", data, "-o", model, *[str(config) if a == "CONFIG" else a for a in args])
    assert result.returncode == 1 and not model.exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"patchcore: error: {field}=")
