"""Seeded random weights: deterministic per seed and name, and sane at every parameter."""
from __future__ import annotations

import torch
from weight_checks import POSITION_IDS, assert_same_weights

from sdcompile.weights.loading import load_models
from sdcompile.weights.random_init import RandomWeights, random_tensor
from sdcompile.weights.writing import ldm_state_dict


def test_random_weights_are_deterministic_per_seed(tiny_recipe, tiny_state):
    again = ldm_state_dict(load_models(tiny_recipe, RandomWeights(7)))
    other = ldm_state_dict(load_models(tiny_recipe, RandomWeights(8)))
    assert_same_weights(tiny_state, again)
    for key, value in tiny_state.items():
        if value.is_floating_point():
            assert not torch.equal(value, other[key]), key


def test_random_weights_initialise_every_parameter_sanely(tiny_models, tiny_state):
    parameters = {k for c in ("unet", "vae", "text_encoder") for k, _ in getattr(tiny_models, c).named_parameters()}
    for key, value in tiny_state.items():
        if key == POSITION_IDS:
            assert torch.equal(value, torch.arange(77)[None])
            continue
        assert value.abs().max() > 0, f"{key} is zero"
        if value.ndim == 1 and key.endswith("weight"):
            assert (value - 1).abs().max() < 0.2, f"{key}: a norm scale should be about 1"
    assert len(parameters) == len(tiny_state) - 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny_models.unet(x, torch.tensor([500.0]), context)
    assert 0.1 < out.std() < 10, "UNet output is trivially small or exploding"


def test_random_tensor_depends_on_name_and_seed_only():
    a = random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=1)
    assert torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=1))
    assert not torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=2))
    assert abs(a.std().item() - (32 * 9) ** -0.5) < 0.01
