"""img2img plans against diffusers' schedulers run as `StableDiffusionImg2ImgPipeline` runs them.

The pipeline keeps `scheduler.timesteps[t_start · order:]` with t_start = steps - min(int(steps ·
strength), steps), calls `set_begin_index` there and starts from `add_noise(x_0, z, first kept
timestep)`; the schedulers' multistep history and warm-up begin at that first kept step.
"""
from __future__ import annotations

import importlib
from unittest import mock

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.recipe import Parameterization
from sdrun.samplers import make_plan, run_plan
from sdrun.samplers.discretize import alphas_cumprod

from tests.runtime.samplers.diffusers_reference import make_scheduler, reference_for, stand_in_model
from tests.runtime.samplers.test_parity import PARITY_RTOL, SD_SCHEDULE, SHAPE, relative_l2

SAMPLERS = ["euler", "euler_karras", "euler_a", "heun", "heun_karras", "dpmpp_2m", "dpmpp_2m_karras",
            "dpmpp_2m_sde", "unipc", "unipc_karras", "lcm"]
CASES = [(7, 0.6), (10, 0.3), (10, 1.0), (20, 0.75), (4, 0.25)]


def diffusers_img2img(sampler_id, parameterization, steps, strength, x0, z, noises):
    import torch

    reference = reference_for(sampler_id)
    scheduler = make_scheduler(reference, parameterization, steps, alphas_cumprod(SD_SCHEDULE))
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(z), timesteps[:1])
    module = importlib.import_module(type(scheduler).__module__)
    current = {}
    with mock.patch.object(module, "randn_tensor", lambda *a, **k: current["noise"].clone(), create=True):
        for e, t in enumerate(timesteps):
            current["noise"] = torch.from_numpy(noises[e])
            y = torch.from_numpy(stand_in_model(scheduler.scale_model_input(x, t).numpy(), float(t)))
            kwargs = {"variance_noise": current["noise"]} if reference.noise == "variance_noise" else {}
            x = scheduler.step(y, t, x, **kwargs).prev_sample
    return x.numpy(), len(timesteps)


@pytest.mark.parametrize("steps, strength", CASES)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("sampler_id", SAMPLERS)
def test_img2img_plan_equals_diffusers_img2img(sampler_id, parameterization, steps, strength):
    rng = np.random.default_rng(3)
    x0, z = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    noises = [rng.standard_normal(SHAPE) for _ in range(2 * steps)]
    plan = make_plan(sampler_id, SD_SCHEDULE, Parameterization(parameterization), steps, strength=strength)
    ours = run_plan(plan, stand_in_model, z, noises, x0=x0)
    theirs, evaluations = diffusers_img2img(sampler_id, parameterization, steps, strength, x0, z, noises)
    assert len(plan) == evaluations
    assert relative_l2(ours, theirs) < PARITY_RTOL


@pytest.mark.parametrize("steps, strength", [(10, 0.6), (7, 1.0), (7, 0.5), (30, 0.75), (50, 1.0)])
def test_ddim_img2img_plan_keeps_ldm_semantics(steps, strength):
    """Noised one DDIM step above the first step run, as ldm's `stochastic_encode` / `decode`, also where
    ldm's table is longer than the step count (T % steps != 0)."""
    from sdrun.samplers.ddim import ddim_table
    from tests.runtime.samplers.ldm_img2img import _noise_index, img2img_start, img2img_table

    table = ddim_table(SD_SCHEDULE, steps, 0.0)
    plan = make_plan("ddim", SD_SCHEDULE, Parameterization.EPS, steps, spacing=None, strength=strength)
    t_enc = img2img_start(steps, strength)
    np.testing.assert_array_equal(plan.timesteps, img2img_table(table, t_enc).timesteps)
    assert plan.x0_scale == pytest.approx(np.sqrt(table.a_t[_noise_index(table, t_enc)]))


@pytest.mark.parametrize("strength", [0.05, 0.0])
def test_a_strength_that_leaves_no_step_is_refused(strength):
    with pytest.raises(UserError, match="strength"):
        make_plan("euler", SD_SCHEDULE, Parameterization.EPS, 10, strength=strength)
