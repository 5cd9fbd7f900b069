"""Euler, Euler ancestral and Heun over the probability-flow ODE in Karras form.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"):
x = x_0 + s·ε, dx/ds = (x - D(x; s)) / s with D the denoiser. Euler is alg. 1 without the
second-order correction, Heun is alg. 1 (the correction skipped on the step to s = 0); Euler
ancestral splits each step into a deterministic step to s_down and fresh noise of size s_up
(k-diffusion `get_ancestral_step`). Timesteps, sigmas and `init_noise_sigma` follow diffusers'
Euler/Heun schedulers; the UNet sees x / sqrt(s² + 1). img2img (`start` = k, the first step
run) keeps steps k.. and starts from x_0 + s_k·z, diffusers' `add_noise` for these schedulers.
"""
from __future__ import annotations

import numpy as np

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import (Spacing, alphas_cumprod, karras_denoised, karras_sigmas, sigma_to_t,
                                       sigmas_at, spaced_timesteps)
from sdrun.samplers.plan import Evaluation, Program


def karras_schedule(schedule: DDPMSchedule, steps: int, spacing: Spacing, karras: bool):
    """(timesteps (n,), sigmas (n + 1,) ending in 0) as diffusers' Euler and Heun pick them."""
    alphas = alphas_cumprod(schedule)
    timesteps = spaced_timesteps(spacing, steps, len(alphas))
    sigmas = sigmas_at(timesteps, alphas)
    if karras:  # between the spaced schedule's own end points
        sigmas = karras_sigmas(sigmas[0], sigmas[-1], steps)
        timesteps = sigma_to_t(sigmas, alphas)
    return timesteps, np.append(sigmas, 0.0)


def init_sigma(sigmas, spacing: Spacing) -> float:
    """diffusers' `init_noise_sigma`: s_max, or sqrt(s_max² + 1) under leading spacing."""
    top = float(np.max(sigmas))
    return top if spacing in (Spacing.LINSPACE, Spacing.TRAILING) else float(np.hypot(top, 1.0))


def _program(width: int, evaluations, sigmas, spacing: Spacing, start: int | None) -> Program:
    """txt2img from init_sigma·z, or img2img from x_0 + s_start·z (the Karras latent x_0 + s·ε)."""
    if start is None:
        return Program(width, tuple(evaluations), init_sigma(sigmas, spacing))
    return Program(width, tuple(evaluations), float(sigmas[start]), x0_scale=1.0)


def _c_in(sigma) -> float:
    return 1.0 / np.sqrt(sigma * sigma + 1.0)


def _euler_update(sigma, sigma_next, p: Parameterization):
    def update(state, y, z):
        (x,) = state
        d = (x - karras_denoised(x, y, sigma, p)) / sigma  # dx/ds
        return [x + (sigma_next - sigma) * d]
    return update


def euler(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing, karras: bool,
          start: int | None = None, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, alg. 1 first order)."""
    timesteps, sigmas = karras_schedule(schedule, steps, spacing, karras)
    evaluations = [Evaluation(t, _c_in(s), _euler_update(s, s_next, p))
                   for t, s, s_next in zip(timesteps, sigmas, sigmas[1:])]
    return _program(1, evaluations[start or 0:], sigmas, spacing, start)


def ancestral_step(sigma, sigma_next):
    """(s_down, s_up): s_up² = s_next²(s² - s_next²)/s², s_down² = s_next² - s_up² (η = 1)."""
    up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return np.sqrt(sigma_next**2 - up**2), up


def _ancestral_update(sigma, sigma_next, p: Parameterization):
    down, up = ancestral_step(sigma, sigma_next)
    def update(state, y, z):
        (x,) = state
        d = (x - karras_denoised(x, y, sigma, p)) / sigma
        return [x + (down - sigma) * d + up * z]
    return update


def euler_ancestral(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing,
                    start: int | None = None, **_):
    """Euler steps to s_down plus s_up of fresh noise (k-diffusion `sample_euler_ancestral`)."""
    timesteps, sigmas = karras_schedule(schedule, steps, spacing, False)
    evaluations = [Evaluation(t, _c_in(s), _ancestral_update(s, s_next, p))
                   for t, s, s_next in zip(timesteps, sigmas, sigmas[1:])]
    return _program(1, evaluations[start or 0:], sigmas, spacing, start)


def _heun_predict(sigma, sigma_next, p: Parameterization):
    """Stage 1, state [x, x_start, d]: Euler predictor; keep its start point and slope."""
    def update(state, y, z):
        x = state[0]
        d = (x - karras_denoised(x, y, sigma, p)) / sigma
        return [x + (sigma_next - sigma) * d, x, d]
    return update


def _heun_correct(sigma, sigma_next, p: Parameterization):
    """Stage 2 at s_next: average the two slopes and redo the step from x_start."""
    def update(state, y, z):
        x, x_start, d_start = state
        d = (x - karras_denoised(x, y, sigma_next, p)) / sigma_next
        return [x_start + (sigma_next - sigma) * 0.5 * (d_start + d), 0.0 * x, 0.0 * x]
    return update


def heun(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing, karras: bool,
         start: int | None = None, **_):
    """Heun's 2nd-order method (Karras et al. 2022, alg. 1); the last step to s = 0 is Euler."""
    timesteps, sigmas = karras_schedule(schedule, steps, spacing, karras)
    evaluations = []
    for i, (t, s, s_next) in enumerate(zip(timesteps, sigmas, sigmas[1:])):
        if i < (start or 0):  # img2img: a step's two stages are kept or dropped together
            continue
        evaluations.append(Evaluation(t, _c_in(s), _heun_predict(s, s_next, p)))
        if s_next > 0:
            t_next = timesteps[i + 1]
            evaluations.append(Evaluation(t_next, _c_in(s_next), _heun_correct(s, s_next, p)))
    return _program(3, evaluations, sigmas, spacing, start)
