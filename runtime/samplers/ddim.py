"""DDIM (Song et al. 2021) as a plan: state [x], the update of `sdrun.schedulers.ddim_step`.

Without a spacing the timesteps are ldm's uniform discretization (`ddim_table`, the numbers the
runtime has always produced); with one they are diffusers' `DDIMScheduler`'s, whose ᾱ_{t-1} is
taken at t - T // S (ᾱ_0 once that falls below 0, `set_alpha_to_one = False`). img2img keeps
ldm's semantics (`sdrun.schedulers.q_sample_ddim`): steps k.. run from the noise level one step
above step k, sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) z at step max(k - 1, 0).
"""
from __future__ import annotations

import numpy as np

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import Spacing, spaced_timesteps
from sdrun.samplers.plan import Evaluation, Program
from sdrun.schedulers import alphas_cumprod, ddim_step_coefficients, ddim_table


def ddim_alphas(schedule: DDPMSchedule, steps: int, spacing: Spacing | None):
    """(timesteps, ᾱ_t, ᾱ_{t-1}) in sampling order."""
    if spacing is None:
        table = ddim_table(schedule, steps, 0.0)
        return table.timesteps.astype(np.float64), table.a_t, table.a_prev
    alphas = alphas_cumprod(schedule)
    if spacing is Spacing.LINSPACE:  # DDIMScheduler rounds its linspace; multistep drops a point
        timesteps = np.linspace(0, len(alphas) - 1, steps).round()[::-1]
    else:
        timesteps = spaced_timesteps(spacing, steps, len(alphas))
    previous = timesteps.astype(np.int64) - len(alphas) // steps
    a_prev = np.where(previous >= 0, alphas[np.maximum(previous, 0)], alphas[0])
    return timesteps, alphas[timesteps.astype(np.int64)], a_prev


def _ddim_update(a_t, a_prev, eta, p: Parameterization):
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))  # eq. 16
    c_x, c_out = ddim_step_coefficients(a_t, a_prev, sigma, p)
    def update(state, y, z):
        return [c_x * state[0] + c_out * y + sigma * z]
    return update


def ddim(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing | None, eta: float = 0.0,
         start: int | None = None, **_):
    """DDIM eq. 12 with σ_t = η·(eq. 16); η = 0 is the deterministic sampler."""
    timesteps, a_t, a_prev = ddim_alphas(schedule, steps, spacing)
    evaluations = [Evaluation(t, 1.0, _ddim_update(a, a_p, eta, p))
                   for t, a, a_p in zip(timesteps, a_t, a_prev)]
    if start is None:
        return Program(1, tuple(evaluations), 1.0)
    a = a_t[max(start - 1, 0)]  # ldm: noised to ddim_timesteps[t_enc], denoised from [t_enc - 1]
    return Program(1, tuple(evaluations[start:]), float(np.sqrt(1.0 - a)), x0_scale=float(np.sqrt(a)))
