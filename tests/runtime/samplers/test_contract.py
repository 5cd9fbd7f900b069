"""The plan contract every sampler meets, the registry's names and its refusals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers import (SAMPLERS, apply_plan_step, initial_state, make_plan, make_program,
                            model_input, resolve_sampler, run_plan, run_program)
from sdrun.samplers.ddim import ddim_step, ddim_table

from tests.runtime.samplers.diffusers_reference import stand_in_model

SD_SCHEDULE = DDPMSchedule(linear_start=0.00085, linear_end=0.012, timesteps=1000)
SHAPE = (1, 4, 8, 8)
MAX_STORED = 4  # K: tensors a method may keep besides the latent


def _noises(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), [rng.standard_normal(SHAPE) for _ in range(n)]


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_plan_reproduces_reference_loop(sampler_id, parameterization):
    program = make_program(sampler_id, SD_SCHEDULE, parameterization, 12)
    plan = make_plan(sampler_id, SD_SCHEDULE, parameterization, 12)
    assert 1 <= plan.width <= MAX_STORED + 1
    assert plan.A.shape == (len(plan), plan.width, plan.width + 1)
    assert plan.noise_scale.shape == (len(plan), plan.width)
    init, noises = _noises(len(plan))
    ours = run_plan(plan, stand_in_model, init, noises)
    reference = run_program(program, stand_in_model, init, noises)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_noise_only_where_needed(sampler_id):
    plan = make_plan(sampler_id, SD_SCHEDULE, Parameterization.EPS, 10)
    state = initial_state(plan, np.ones(SHAPE))
    if not plan.needs_noise.any():
        apply_plan_step(plan, 0, state, model_input(plan, 0, state))
    else:
        e = int(np.argmax(plan.needs_noise))
        with pytest.raises(ValueError, match="needs a noise tensor"):
            apply_plan_step(plan, e, state, np.ones(SHAPE))


@pytest.mark.parametrize("steps", [7, 30, 50])
@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_the_ddim_plan_reproduces_ldms_ddim_step(steps, parameterization):
    """The default DDIM plan is ldm's DDIM (`ddim_step` over `ddim_table`), number for number."""
    table = ddim_table(SD_SCHEDULE, steps, 0.3)
    init, noises = _noises(len(table))
    x = init
    for i in range(len(table)):
        y = stand_in_model(x, float(table.timesteps[i]))
        x = ddim_step(x, y, table.a_t[i], table.a_prev[i], table.sigma[i], noises[i],
                      parameterization)
    plan = make_plan("DDIM", SD_SCHEDULE, parameterization, steps, eta=0.3)
    np.testing.assert_array_equal(plan.timesteps, table.timesteps)
    np.testing.assert_allclose(run_plan(plan, stand_in_model, init, noises), x, rtol=1e-12)


@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_label_and_id_resolve_to_the_same_sampler(sampler_id):
    sampler = SAMPLERS[sampler_id]
    assert resolve_sampler(sampler.label) is sampler is resolve_sampler(sampler_id)
    assert sampler.description and "\n" not in sampler.description


def test_web_ui_names():
    assert resolve_sampler("Euler a").id == "euler_a"
    assert resolve_sampler("DPM++ 2M Karras").id == "dpmpp_2m_karras"
    assert resolve_sampler("dpm++ 2m sde karras").karras


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UserError) as caught:
        resolve_sampler("Euler b")
    assert "Euler a (euler_a)" in str(caught.value) and "'Euler b'" in str(caught.value)


def test_karras_refused_without_sigmas():
    with pytest.raises(UserError, match="no noise levels"):
        make_plan("DDIM", SD_SCHEDULE, Parameterization.EPS, 20, karras=True)


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_bad_step_counts_refused(steps):
    with pytest.raises(UserError, match="sampling steps"):
        make_plan("Euler", SD_SCHEDULE, Parameterization.EPS, steps)


def test_bad_spacing_and_eta_refused():
    with pytest.raises(UserError, match="spacing"):
        make_plan("Euler", SD_SCHEDULE, Parameterization.EPS, 20, spacing="middle")
    with pytest.raises(UserError, match="eta"):
        make_plan("DDIM", SD_SCHEDULE, Parameterization.EPS, 20, eta=1.5)
    with pytest.raises(UserError, match="takes no eta"):
        make_plan("Euler", SD_SCHEDULE, Parameterization.EPS, 20, eta=0.5)


def test_import_is_numpy_only():
    code = ("import sys, sdrun.samplers; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_too_few_steps_for_the_order_refused():
    with pytest.raises(UserError, match="PLMS needs 2 steps"):
        make_plan("PLMS", SD_SCHEDULE, Parameterization.EPS, 1)


def test_lcm_step_limit_and_guidance_warning():
    with pytest.raises(UserError, match="Too many steps for LCM"):
        make_plan("LCM", SD_SCHEDULE, Parameterization.EPS, 51)
    assert make_plan("LCM", SD_SCHEDULE, Parameterization.EPS, 4, guidance=1.0).warnings == ()
    (warning,) = make_plan("LCM", SD_SCHEDULE, Parameterization.EPS, 4, guidance=7.5).warnings
    assert "guidance scale 7.5 > 1" in warning
