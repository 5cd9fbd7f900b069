"""Writing our models as ldm single files, and reading them back bit-exactly."""
from __future__ import annotations

import pytest
import torch
from weight_checks import assert_same_weights

from sdcompile.weights.loading import load_models
from sdcompile.weights.random_init import RandomWeights
from sdcompile.weights.single_file import read_state_dict_file
from sdcompile.weights.writing import ldm_state_dict, save_ldm_checkpoint


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(tmp_path, tiny_recipe, tiny_models, suffix):
    path = save_ldm_checkpoint(tiny_models, tmp_path / f"tiny{suffix}")
    loaded = load_models(tiny_recipe, path)
    assert_same_weights(ldm_state_dict(tiny_models), ldm_state_dict(loaded))
    assert loaded.report.skipped == () and loaded.report.filled == ()
    assert not list(tmp_path.glob(".*partial")), "temporary file left behind"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


def test_fp16_file_loads_as_fp32(tmp_path, tiny_recipe, tiny_models):
    half = load_models(tiny_recipe, RandomWeights(7), dtype=torch.float16)
    path = save_ldm_checkpoint(half, tmp_path / "half.safetensors")
    loaded = load_models(tiny_recipe, path, dtype=torch.float32)
    assert loaded.report.file_dtypes == ("float16",)
    stored_state = ldm_state_dict(half)
    for key, value in ldm_state_dict(loaded).items():
        stored = stored_state[key]
        expected_dtype = torch.float32 if stored.is_floating_point() else stored.dtype
        assert value.dtype == expected_dtype and torch.equal(value, stored.to(value.dtype)), key


def test_read_state_dict_file_reads_both_formats(tmp_path, tiny_models, tiny_state):
    for suffix in (".safetensors", ".ckpt"):
        path = save_ldm_checkpoint(tiny_models, tmp_path / f"tiny{suffix}")
        assert_same_weights(tiny_state, read_state_dict_file(path))
