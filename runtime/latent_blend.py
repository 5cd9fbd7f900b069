"""Inpainting with an ordinary (4-channel) UNet: latent blending between model evaluations.

After evaluation e the kept region (mask 0) of the latent state[0] is replaced by the input image's latent
x_0 noised to the level the next evaluation sees, with the loop's initial unit noise z; after the last one,
by x_0 itself (diffusers' `StableDiffusionInpaintPipeline` for 4-channel UNets: `add_noise(x_0, noise,
timesteps[i + 1])`, the web UIs' latent mask). It runs on the host between steps, for the plain and the
step-fused loop alike.

The next evaluation sees c_in·state[0] = α·(x_0 + s·z), the VP latent at Karras noise level s with
α = 1/sqrt(1 + s²), so the kept latent is state[0] = (α / c_in)·(x_0 + s·z). Karras-form plans
(c_in < 1: the Euler family) give s = sqrt(1/c_in² − 1) exactly; VP-form plans (c_in = 1) give s at the
evaluation's timestep as diffusers interpolates it (exact at integer timesteps; multistep solvers with
Karras sigmas round their timesteps, so there the kept region follows the rounded step's level).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdrun.recipe import DDPMSchedule
from sdrun.samplers.discretize import alphas_cumprod, sigmas_at, vp_coefficients
from sdrun.samplers.plan import Plan

Blend = Callable[[int, np.ndarray], np.ndarray]  # (evaluation e, state[0] after it) -> blended state[0]


def kept_latent_coefficients(plan: Plan, schedule: DDPMSchedule) -> np.ndarray:
    """(E, 2) float64: after evaluation e the kept latent is row[0]·x_0 + row[1]·z (last row (1, 0))."""
    c_in, timesteps = plan.c_in[1:], plan.timesteps[1:]
    vp_form = c_in >= 1.0
    with np.errstate(divide="ignore"):
        karras_levels = np.sqrt(np.maximum(1.0 / np.square(c_in) - 1.0, 0.0))
    levels = np.where(vp_form, sigmas_at(timesteps, alphas_cumprod(schedule)), karras_levels)
    alpha, _ = vp_coefficients(levels)
    scale = alpha / c_in
    return np.concatenate([np.stack([scale, scale * levels], axis=1), [[1.0, 0.0]]])


def latent_blend(plan: Plan, schedule: DDPMSchedule, x0: np.ndarray, noise: np.ndarray,
                 repaint: np.ndarray) -> Blend:
    """The blend of a loop: `x0` and `noise` (B, 4, h, w), `repaint` (B, 1, h, w) the binarised latent mask."""
    rows = kept_latent_coefficients(plan, schedule)
    keep = 1.0 - repaint

    def blend(e: int, latent: np.ndarray) -> np.ndarray:
        kept = rows[e, 0] * x0 + rows[e, 1] * noise
        return (repaint * latent + keep * kept).astype(np.float32)

    return blend
