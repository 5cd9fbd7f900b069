"""PLMS against ldm's `p_sample_plms` recurrence, written out here independently of the plan."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers import make_plan, run_plan
from sdrun.samplers.ddim import ddim_table
from sdrun.samplers.discretize import alphas_cumprod

from tests.runtime.samplers.diffusers_reference import stand_in_model

SD_SCHEDULE = DDPMSchedule(linear_start=0.00085, linear_end=0.012, timesteps=1000)


def ldm_plms(steps, x, parameterization):
    """ldm `PLMSSampler.plms_sampling` with η = 0, no guidance, written after its source."""
    alphas = alphas_cumprod(SD_SCHEDULE)
    table = ddim_table(SD_SCHEDULE, steps, 0.0)  # time_range, ddim_alphas, ddim_alphas_prev
    ts, a_ts, a_prevs = table.timesteps, table.a_t, table.a_prev

    def model_eps(x, t):
        out = stand_in_model(x, float(t))
        if parameterization is Parameterization.V:  # predict_eps_from_z_and_v
            return np.sqrt(alphas[t]) * out + np.sqrt(1 - alphas[t]) * x
        return out

    def x_prev_of(x, e, i):  # get_x_prev_and_pred_x0
        pred_x0 = (x - np.sqrt(1 - a_ts[i]) * e) / np.sqrt(a_ts[i])
        return np.sqrt(a_prevs[i]) * pred_x0 + np.sqrt(1 - a_prevs[i]) * e

    old_eps = []
    for i, t in enumerate(ts):
        t_next = ts[min(i + 1, len(ts) - 1)]
        e_t = model_eps(x, t)
        if len(old_eps) == 0:  # pseudo improved Euler (2nd order Heun)
            x_prev = x_prev_of(x, e_t, i)
            e_prime = (e_t + model_eps(x_prev, t_next)) / 2
        elif len(old_eps) == 1:  # 2nd order pseudo linear multistep (Adams-Bashforth)
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_prime, i)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("steps", [2, 3, 7, 20, 50])
def test_plms_golden(steps, parameterization):
    init = np.random.default_rng(3).standard_normal((1, 4, 8, 8))
    plan = make_plan("PLMS", SD_SCHEDULE, parameterization, steps)
    assert len(plan) == len(ddim_table(SD_SCHEDULE, steps, 0.0)) + 1  # the first step runs twice
    np.testing.assert_allclose(run_plan(plan, stand_in_model, init),
                               ldm_plms(steps, init, parameterization), rtol=1e-12, atol=1e-12)
