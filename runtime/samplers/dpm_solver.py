"""DPM++ 2M and DPM++ 2M SDE (Lu et al. 2022, "DPM-Solver++", alg. 2 and its SDE variant).

In the VP latent with λ = log(α/σ) = -log s and h = λ_t - λ_s (so e^{-h} = s_t / s_s):
  2M:      x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) (D + (D - D_prev) / (2 r))
  2M SDE:  x_t = (σ_t/σ_s) e^{-h} x + α_t (1 - e^{-2h}) (D + (D - D_prev) / (2 r))
                 + σ_t sqrt(1 - e^{-2h}) z
with r = h_prev / h (the midpoint solver type). The first step and the final step to s = 0 are
first order (drop the D_prev term), as diffusers' `lower_order_final` with `final_sigmas_type =
"zero"`. State [x, D_prev]; timesteps and sigmas as diffusers' DPMSolverMultistepScheduler.
img2img (`start` = k) runs steps k.. from α_k x_0 + σ_k z (diffusers' `add_noise`), its first
step first order again: the multistep history begins at the first step run.
"""
from __future__ import annotations

import numpy as np

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import (Spacing, alphas_cumprod, denoised, karras_sigmas, sigma_to_t, sigmas_at,
                                       spaced_timesteps, train_sigmas, vp_coefficients)
from sdrun.samplers.plan import Evaluation, Program


def multistep_schedule(schedule: DDPMSchedule, steps: int, spacing: Spacing, karras: bool):
    """(timesteps (n,), sigmas (n + 1,) ending in 0) as diffusers' multistep solvers pick them.

    Karras sigmas span the whole training range and their timesteps are rounded to integers.
    """
    alphas = alphas_cumprod(schedule)
    if karras:
        train = train_sigmas(alphas)
        sigmas = karras_sigmas(train[-1], train[0], steps)
        timesteps = sigma_to_t(sigmas, alphas).round()
    else:
        timesteps = spaced_timesteps(spacing, steps, len(alphas), extra=1)
        sigmas = sigmas_at(timesteps, alphas)
    return timesteps, np.append(sigmas, 0.0)


def vp_program(width: int, evaluations, sigmas, start: int | None) -> Program:
    """txt2img from z, or img2img from α_start x_0 + σ_start z (the VP latent at s_start)."""
    if start is None:
        return Program(width, tuple(evaluations), 1.0)
    alpha, sigma = vp_coefficients(sigmas[start])
    return Program(width, tuple(evaluations), float(sigma), x0_scale=float(alpha))


def log_snr_step(sigma, sigma_next) -> float:
    """h = λ_next - λ = log(s / s_next) (inf for the step to s = 0)."""
    with np.errstate(divide="ignore"):
        return float(np.log(sigma / sigma_next))


def _dpmpp_update(sigmas, i: int, second_order: bool, sde: bool, p: Parameterization):
    s, s_next = sigmas[i], sigmas[i + 1]
    alpha_s, sigma_s = vp_coefficients(s)
    alpha_t, sigma_t = vp_coefficients(s_next)
    ratio = s_next / s  # e^{-h}
    if sde:
        c_x, c_d, c_z = sigma_t / sigma_s * ratio, alpha_t * (1 - ratio**2), sigma_t * np.sqrt(1 - ratio**2)
    else:
        c_x, c_d, c_z = sigma_t / sigma_s, -alpha_t * (ratio - 1), 0.0
    r = log_snr_step(sigmas[i - 1], s) / log_snr_step(s, s_next) if second_order else 1.0

    def update(state, y, z):
        x, d_prev = state
        d = denoised(x, y, alpha_s, sigma_s, p)
        correction = (d - d_prev) / (2 * r) if second_order else 0.0 * d
        return [c_x * x + c_d * (d + correction) + c_z * z, d]
    return update


def _dpmpp(schedule, p, steps, spacing, karras, sde: bool, start: int | None) -> Program:
    timesteps, sigmas = multistep_schedule(schedule, steps, spacing, karras)
    n, first = len(timesteps), start or 0
    evaluations = [Evaluation(timesteps[i], 1.0, _dpmpp_update(sigmas, i, first < i < n - 1, sde, p))
                   for i in range(first, n)]
    return vp_program(2, evaluations, sigmas, start)


def dpmpp_2m(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing,
             karras: bool, start: int | None = None, **_) -> Program:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver."""
    return _dpmpp(schedule, p, steps, spacing, karras, sde=False, start=start)


def dpmpp_2m_sde(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing,
                 karras: bool, start: int | None = None, **_) -> Program:
    """SDE-DPM-Solver++(2M): the same multistep update plus fresh noise each step."""
    return _dpmpp(schedule, p, steps, spacing, karras, sde=True, start=start)
