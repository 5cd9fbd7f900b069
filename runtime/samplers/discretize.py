"""Timestep spacings, noise levels and the ε/v → denoised conversion the samplers share.

Notation: ᾱ_t the training schedule's cumulative product; the variance-preserving (VP) latent is
x_t = α_t x_0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t); the variance-exploding
(Karras et al. 2022) noise level is s = σ_t / α_t and its latent x_t / α_t = x_0 + s ε.
"""
from __future__ import annotations

import enum

import numpy as np

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization

STEPS_OFFSET = 1  # SD's published scheduler config: `steps_offset = 1`
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def alphas_cumprod(schedule: DDPMSchedule) -> np.ndarray:
    """(T,) float64 ᾱ_t for t = 0 .. T-1 (ldm `make_beta_schedule("linear")`)."""
    betas = np.linspace(np.sqrt(schedule.linear_start), np.sqrt(schedule.linear_end),
                        schedule.timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class Spacing(enum.Enum):
    """How inference timesteps are picked (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", table 2)."""

    LEADING = "leading"
    LINSPACE = "linspace"
    TRAILING = "trailing"


def parse_spacing(value) -> Spacing | None:
    """None (the sampler's default), a Spacing, or its name."""
    if value is None or isinstance(value, Spacing):
        return value
    try:
        return Spacing(value)
    except ValueError:
        raise UserError("Unknown timestep spacing.",
                        expected=", ".join(s.value for s in Spacing), got=repr(value),
                        fix="leave it unset for the sampler's default") from None


def spaced_timesteps(spacing: Spacing, steps: int, train_steps: int, extra: int = 0) -> np.ndarray:
    """(steps,) float64 descending, as diffusers' `set_timesteps` picks them.

    `extra = 1` is the multistep solvers' variant: linspace and leading space steps + 1 points
    and drop the last (t = 0 or its offset); their linspace values are then rounded.
    """
    n = steps + extra
    if spacing is Spacing.LINSPACE:
        t = np.linspace(0, train_steps - 1, n)[::-1][:steps]
        return t.round() if extra else t
    if spacing is Spacing.LEADING:
        return (np.arange(n) * (train_steps // n)).round()[::-1][:steps] + STEPS_OFFSET
    return np.arange(train_steps, 0, -train_steps / steps).round() - 1.0


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(T,) Karras noise levels s_t = sqrt((1 - ᾱ_t) / ᾱ_t), ascending in t."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigmas_at(timesteps: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """s at (possibly fractional) timesteps by linear interpolation in t, as diffusers does."""
    sigmas = train_sigmas(alphas_cumprod)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """(steps,) Karras et al. 2022 eq. 5: (s_max^(1/ρ) + i/(n-1)·(s_min^(1/ρ) - s_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / KARRAS_RHO), sigma_max ** (1.0 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Fractional timesteps of noise levels: linear interpolation in log s between neighbours."""
    log_train = np.log(train_sigmas(alphas_cumprod))
    log_s = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_train, log_s, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_s) / (log_train[low] - log_train[low + 1]), 0.0, 1.0)
    return low + w


def vp_coefficients(sigma):
    """(α_t, σ_t) of the VP latent at Karras noise level s: α = 1/sqrt(1 + s²), σ = s·α."""
    alpha = 1.0 / np.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def denoised(x, y, alpha, sigma, parameterization: Parameterization):
    """x̂_0 from the VP latent x and the model output y (ε: (x - σy)/α; v: αx - σy).

    Linear in (x, y): works on arrays and on the basis vectors `build_plan` passes.
    """
    if parameterization is Parameterization.V:
        return alpha * x - sigma * y
    return (x - sigma * y) / alpha


def predicted_eps(x, y, alpha, sigma, parameterization: Parameterization):
    """ε̂ from the VP latent x and the model output y (v: αy + σx)."""
    if parameterization is Parameterization.V:
        return alpha * y + sigma * x
    return y


def karras_denoised(x, y, sigma, parameterization: Parameterization):
    """x̂_0 from the Karras latent x = x_0 + s·ε (the VP latent is α·x)."""
    alpha, sigma_vp = vp_coefficients(sigma)
    return denoised(alpha * x, y, alpha, sigma_vp, parameterization)
