"""Strict loading: what is skipped and what is filled in, and the load report that says so."""
from __future__ import annotations

import torch
from safetensors.torch import save_file
from weight_checks import POSITION_IDS, assert_same_weights, tiny_with_openclip

from sdcompile.weights.loading import load_models
from sdcompile.weights.random_init import RandomWeights
from sdcompile.weights.writing import ldm_state_dict


def test_ema_keys_and_ddpm_buffers_are_skipped_and_reported(tmp_path, tiny_recipe, tiny_state):
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000),
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(32, 4, 3, 3),
        "betas": torch.ones(1000), "alphas_cumprod": torch.ones(1000), "posterior_mean_coef2": torch.ones(1000),
    }
    path = tmp_path / "full.safetensors"
    save_file(tiny_state | extras, str(path))
    loaded = load_models(tiny_recipe, path)
    groups = {group.reason: group for group in loaded.report.skipped}
    assert groups["EMA keys (model_ema.*)"].count == 3
    assert groups["DDPM schedule buffers"].count == 3
    assert "betas" in groups["DDPM schedule buffers"].examples
    assert any("skipped 3 EMA keys" in line for line in loaded.report.lines())
    assert_same_weights(tiny_state, ldm_state_dict(loaded))


def test_absent_position_ids_are_filled(tmp_path, tiny_recipe, tiny_state):
    path = tmp_path / "no_position_ids.safetensors"
    save_file({k: v for k, v in tiny_state.items() if k != POSITION_IDS}, str(path))
    loaded = load_models(tiny_recipe, path)
    assert torch.equal(ldm_state_dict(loaded)[POSITION_IDS], torch.arange(77)[None])
    assert [group.examples for group in loaded.report.filled] == [(POSITION_IDS.removeprefix("cond_stage_model."),)]


def test_openclip_checkpoint_without_unused_keys_loads(tmp_path, tiny_recipe):
    recipe = tiny_with_openclip(tiny_recipe)
    state = ldm_state_dict(load_models(recipe, RandomWeights(3)))
    unused = [k for k in state if k.startswith("cond_stage_model.model.transformer.resblocks.2.")
              or k in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")]
    path = tmp_path / "pruned.safetensors"
    save_file({k: v for k, v in state.items() if k not in unused}, str(path))
    loaded = load_models(recipe, path)
    (group,) = loaded.report.filled
    assert group.count == len(unused) == 14
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    reference = load_models(recipe, RandomWeights(3))
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids), reference.text_encoder(ids))


# --- seeded random weights -------------------------------------------------------------------------------
