"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") as ldm runs it, and as a plan: state [x].

Notation: ᾱ_t (`a_t`) is the product of (1 - β_s) for s ≤ t (the paper's α_t), ᾱ_{t-1} (`a_prev`)
the same at the next timestep the sampler visits, σ_t (`sigma`) the noise scale, z the noise.
Eq. 12:  x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z
Eq. 16:  σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})

ldm's uniform discretization takes every c-th training timestep, c = T // S, shifted by one
(S=50, T=1000: 1, 21, ..., 981). When S does not divide T this gives more than S timesteps
(S=30: 31 steps, the last 991); we follow ldm and sample all of them. With a spacing the
timesteps are diffusers' `DDIMScheduler`'s, whose ᾱ_{t-1} is taken at t - T // S (ᾱ_0 once that
falls below 0, `set_alpha_to_one = False`). img2img keeps ldm's semantics: steps k.. run from
the noise level one step above step k, sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) z at step max(k - 1, 0).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import Spacing, alphas_cumprod, spaced_timesteps
from sdrun.samplers.plan import Evaluation, Program


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMTable:
    """Per-step DDIM values in sampling order (timesteps descending); arrays are read-only."""

    timesteps: np.ndarray  # (n,) int64, the timestep t fed to the UNet at each step
    a_t: np.ndarray  # (n,) float64, ᾱ_t
    a_prev: np.ndarray  # (n,) float64, ᾱ_{t-1}: ᾱ of the next step, ᾱ_0 after the last
    sigma: np.ndarray  # (n,) float64, σ_t (eq. 16)

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """(n,) int64 ascending timesteps of ldm's uniform discretization (n > S when T % S != 0)."""
    if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= num_train_timesteps):
        raise UserError("Invalid number of sampling steps.",
                        expected=f"an integer from 1 to {num_train_timesteps}",
                        got=repr(num_steps), fix="choose a step count such as 50")
    stride = num_train_timesteps // num_steps
    steps = np.arange(0, num_train_timesteps, stride, dtype=np.int64) + 1
    # When the stride divides T - 1 (S = 3, 9, 27, 37, 111, 333 for T = 1000) the last shifted
    # timestep is T itself, where ldm indexes past ᾱ and fails; we drop it.
    return steps[steps < num_train_timesteps]


def ddim_table(schedule: DDPMSchedule, num_steps: int, eta: float) -> DDIMTable:
    """Timesteps, ᾱ_t, ᾱ_{t-1} and σ_t for sampling with `num_steps` steps and η = `eta`."""
    if not 0.0 <= eta <= 1.0:
        raise UserError("Invalid DDIM eta.", expected="a number from 0 (deterministic) to 1",
                        got=repr(eta), fix="use 0.0, the usual choice")
    alphas = alphas_cumprod(schedule)
    steps = ddim_timesteps(num_steps, schedule.timesteps)
    a_t = alphas[steps]
    a_prev = np.concatenate([alphas[:1], alphas[steps[:-1]]])
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    return DDIMTable(*(_read_only(column[::-1]) for column in (steps, a_t, a_prev, sigma)))


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def predict_eps_and_x0(x: np.ndarray, model_output: np.ndarray, a_t,
                       parameterization: Parameterization) -> tuple[np.ndarray, np.ndarray]:
    """Predicted noise ε̂ and clean sample x̂_0 from the UNet's output at x_t."""
    if parameterization is Parameterization.V:
        x0 = np.sqrt(a_t) * x - np.sqrt(1.0 - a_t) * model_output
        eps = np.sqrt(a_t) * model_output + np.sqrt(1.0 - a_t) * x
        return eps, x0
    eps = model_output
    return eps, (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)


def ddim_step(x: np.ndarray, model_output: np.ndarray, a_t, a_prev, sigma, noise: np.ndarray | None,
              parameterization: Parameterization) -> np.ndarray:
    """One DDIM update x_t -> x_{t-1} (eq. 12); `noise` z may be None only when σ_t = 0."""
    if noise is None and np.any(sigma != 0):
        raise ValueError("noise is required when sigma > 0")
    # 1. the UNet's output as predicted noise ε̂ and predicted clean sample x̂_0
    eps, x0 = predict_eps_and_x0(x, model_output, a_t, parameterization)
    # 2. "direction pointing to x_t"
    direction = np.sqrt(1.0 - a_prev - sigma**2) * eps
    # 3. x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + direction + σ_t z
    x_prev = np.sqrt(a_prev) * x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(x.dtype, copy=False)


def ddim_step_coefficients(a_t, a_prev, sigma, parameterization: Parameterization):
    """(c_x, c_out) with ddim_step = c_x·x_t + c_out·model_output + σ_t·z (arrays: one per step).

    Eq. 12 with ε̂, x̂_0 substituted; d = sqrt(1 - ᾱ_{t-1} - σ_t²):
      ε:  c_x = sqrt(ᾱ_{t-1}/ᾱ_t),                 c_out = d - sqrt(ᾱ_{t-1}(1 - ᾱ_t)/ᾱ_t)
      v:  c_x = sqrt(ᾱ_{t-1} ᾱ_t) + d sqrt(1 - ᾱ_t),  c_out = d sqrt(ᾱ_t) - sqrt(ᾱ_{t-1}(1 - ᾱ_t))
    """
    d = np.sqrt(1.0 - a_prev - sigma**2)
    if parameterization is Parameterization.V:
        return (np.sqrt(a_prev * a_t) + d * np.sqrt(1.0 - a_t),
                d * np.sqrt(a_t) - np.sqrt(a_prev * (1.0 - a_t)))
    return np.sqrt(a_prev / a_t), d - np.sqrt(a_prev * (1.0 - a_t) / a_t)


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
    start += len(evaluations) - steps  # ldm counts kept steps from the end of its (maybe longer) table
    a = a_t[max(start - 1, 0)]  # ldm: noised to ddim_timesteps[t_enc], denoised from [t_enc - 1]
    return Program(1, tuple(evaluations[start:]), float(np.sqrt(1.0 - a)), x0_scale=float(np.sqrt(a)))
