"""Latent blending's kept latent is the input image's latent noised to the level the next evaluation sees."""
from __future__ import annotations

import numpy as np
import pytest

from sdcompile.recipes import load_recipe
from sdrun.latent_blend import kept_latent_coefficients
from sdrun.samplers import make_plan
from sdrun.samplers.discretize import alphas_cumprod

STEPS = 10


def test_vp_plans_follow_diffusers_add_noise_at_the_next_timestep():
    """DDIM (VP latent, c_in = 1): sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·z at t = timesteps[e + 1]; x_0 after the last."""
    recipe = load_recipe("tiny")
    plan = make_plan("ddim", recipe.schedule, recipe.parameterization, STEPS)
    alphas = alphas_cumprod(recipe.schedule)[plan.timesteps[1:].astype(int)]
    expected = np.concatenate([np.stack([np.sqrt(alphas), np.sqrt(1 - alphas)], axis=1), [[1.0, 0.0]]])
    np.testing.assert_allclose(kept_latent_coefficients(plan, recipe.schedule), expected, rtol=1e-12)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "euler_karras", "heun"])
def test_karras_form_plans_keep_x0_plus_the_next_noise_level(sampler):
    """The Euler family's latent is x_0 + s·z with s read off the next evaluation's c_in = 1/sqrt(1 + s²)."""
    recipe = load_recipe("tiny")
    plan = make_plan(sampler, recipe.schedule, recipe.parameterization, STEPS)
    rows = kept_latent_coefficients(plan, recipe.schedule)
    levels = np.sqrt(1.0 / plan.c_in[1:] ** 2 - 1.0)
    np.testing.assert_allclose(rows[:-1, 0], 1.0, rtol=1e-12)
    np.testing.assert_allclose(rows[:-1, 1], levels, rtol=1e-12)
    assert tuple(rows[-1]) == (1.0, 0.0)
