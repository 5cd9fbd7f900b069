"""Strict key checking: counts, examples and model-family hints in the error."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from weight_checks import COUNTS, tiny_with_openclip

from sdcompile.weights.loading import load_models
from sdcompile.weights.writing import save_ldm_checkpoint
from sdrun.errors import UserError


def test_sd1_checkpoint_into_openclip_recipe_reports_counts_examples_and_family(tmp_path, tiny_recipe,
                                                                                tiny_models):
    path = save_ldm_checkpoint(tiny_models, tmp_path / "sd1.safetensors")
    with pytest.raises(UserError) as info:
        load_models(tiny_with_openclip(tiny_recipe), path)
    error = info.value
    assert tuple(map(int, COUNTS.search(error.problem).groups())) == (28, 37, 28)
    assert "text_encoder:" in error.got and "model.token_embedding.weight" in error.got
    assert "unet:" in error.got and "attn2.to_k.weight" in error.got
    assert "CLIP in Hugging Face layout" in error.fix and "sd15" in error.fix
    assert "context width 32" in error.fix and "are linear" not in error.fix
    assert "1×1 convolutions (SD 1.x)" in error.fix


def test_checkpoint_of_another_unet_config_reports_counts(tmp_path, tiny_recipe, tiny_models):
    path = save_ldm_checkpoint(tiny_models, tmp_path / "tiny.safetensors")
    deeper = dataclasses.replace(tiny_recipe, unet=dataclasses.replace(tiny_recipe.unet, num_res_blocks=2))
    with pytest.raises(UserError) as info:
        load_models(deeper, path)
    missing, unexpected, misshaped = map(int, COUNTS.search(info.value.problem).groups())
    assert missing > 0 and unexpected > 0 and misshaped > 0
    assert "unet:" in info.value.got and "vae:" not in info.value.got and "text_encoder:" not in info.value.got
    assert "…" in info.value.got  # more than the examples shown


def test_unrecognised_top_level_keys_are_unexpected(tmp_path, tiny_recipe, tiny_state):
    path = tmp_path / "extra.safetensors"
    save_file(tiny_state | {"conditioner.embedders.0.weight": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match="1 unexpected") as info:
        load_models(tiny_recipe, path)
    assert "conditioner.embedders.0.weight" in info.value.got and "SDXL" in info.value.fix
