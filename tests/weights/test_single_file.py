"""Reading ldm single files: nested state_dicts, damaged or unknown files, flattened text keys."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from weight_checks import assert_same_weights

from sdcompile.weights.loading import load_models
from sdcompile.weights.single_file import unwrap_state_dict
from sdcompile.weights.writing import ldm_state_dict
from sdrun.errors import UserError


def test_nested_state_dict_is_unwrapped():
    weights = {"a": torch.ones(1)}
    assert unwrap_state_dict({"state_dict": {"state_dict": weights}, "global_step": 3}) is weights


# --- restricted unpickling -------------------------------------------------------------------------------


def test_missing_file(tmp_path, tiny_recipe):
    with pytest.raises(UserError, match="does not exist") as info:
        load_models(tiny_recipe, tmp_path / "nothing.safetensors")
    assert info.value.expected and info.value.got and info.value.fix


def test_unknown_suffix(tmp_path, tiny_recipe):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_models(tiny_recipe, path)


# --- strict loading reports ------------------------------------------------------------------------------


def test_sd1_text_keys_saved_without_text_model_wrapper_load(tmp_path, tiny_recipe, tiny_state):
    flattened = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
                 for key, value in tiny_state.items()}
    path = tmp_path / "flattened.safetensors"
    save_file(flattened, str(path))
    assert_same_weights(tiny_state, ldm_state_dict(load_models(tiny_recipe, path)))
