"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") as ldm runs it.

Notation: ᾱ_t (`a_t`) is the product of (1 - β_s) for s ≤ t (the paper's α_t), ᾱ_{t-1} (`a_prev`)
the same at the next timestep the sampler visits, σ_t (`sigma`) the noise scale, z the noise.
Eq. 12:  x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z
Eq. 16:  σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})

Everything here is a pure function of its arguments; noise is always passed in.

ldm's uniform discretization takes every c-th training timestep, c = T // S, shifted by one
(S=50, T=1000: 1, 21, ..., 981). When S does not divide T this gives more than S timesteps
(S=30: 31 steps, the last 991); we follow ldm and sample all of them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMTable:
    """Per-step DDIM values in sampling order (timesteps descending); arrays are read-only."""

    timesteps: np.ndarray  # (n,) int64, the timestep t fed to the UNet at each step
    a_t: np.ndarray  # (n,) float64, ᾱ_t
    a_prev: np.ndarray  # (n,) float64, ᾱ_{t-1}: ᾱ of the next step, ᾱ_0 after the last
    sigma: np.ndarray  # (n,) float64, σ_t (eq. 16)

    def __len__(self) -> int:
        return len(self.timesteps)


def alphas_cumprod(schedule: DDPMSchedule) -> np.ndarray:
    """(T,) float64 ᾱ_t for t = 0 .. T-1 (ldm `make_beta_schedule("linear")`)."""
    betas = np.linspace(np.sqrt(schedule.linear_start), np.sqrt(schedule.linear_end),
                        schedule.timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


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


def classifier_free_guidance(uncond: np.ndarray, cond: np.ndarray, scale: float) -> np.ndarray:
    """Guided model output uncond + scale·(cond - uncond) (Ho & Salimans 2022), for ε or v alike."""
    return uncond + scale * (cond - uncond)


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


def img2img_start(num_steps: int, strength: float) -> int:
    """ldm's t_enc = int(strength · num_steps): how many DDIM steps img2img denoises."""
    if not (isinstance(num_steps, (int, np.integer)) and num_steps >= 1):
        raise UserError("Invalid number of sampling steps.", expected="an integer of at least 1",
                        got=repr(num_steps), fix="choose a step count such as 50")
    if not 0.0 < strength <= 1.0:
        raise UserError("Invalid img2img strength.",
                        expected="a number in (0, 1]: how much of the input image is re-noised",
                        got=repr(strength), fix="use e.g. 0.75 (SD1 default) or 0.8 (SD2 default)")
    return int(strength * num_steps)


def _noise_index(table: DDIMTable, t_enc: int) -> int:
    """Index (sampling order) of ldm's ascending `ddim_alphas[t_enc]`, clamped to the noisiest step.

    t_enc equals the table length only for strength 1.0 with S dividing T, where ldm indexes past
    its table; we noise to the noisiest DDIM timestep instead and then run every step, as
    diffusers' img2img does at strength 1.0.
    """
    if not 0 <= t_enc <= len(table):
        raise ValueError(f"t_enc must be in [0, {len(table)}], got {t_enc}")
    return max(len(table) - 1 - t_enc, 0)


def q_sample_ddim(x0: np.ndarray, noise: np.ndarray, table: DDIMTable, t_enc: int) -> np.ndarray:
    """Noise x_0 to DDIM step t_enc: sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) z (ldm `stochastic_encode`)."""
    a = table.a_t[_noise_index(table, t_enc)]
    return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise).astype(x0.dtype, copy=False)


def img2img_table(table: DDIMTable, t_enc: int) -> DDIMTable:
    """The steps ldm's img2img `decode` runs: ascending ddim_timesteps[:t_enc], in sampling order.

    For t_enc below the table length the first step's timestep is one DDIM step below the noise
    level of `q_sample_ddim` (ldm: noised to ddim_timesteps[t_enc], denoised from [t_enc - 1]).
    """
    start = len(table) - t_enc
    if not 0 <= start <= len(table):
        raise ValueError(f"t_enc must be in [0, {len(table)}], got {t_enc}")
    return DDIMTable(*(_read_only(column[start:]) for column in
                       (table.timesteps, table.a_t, table.a_prev, table.sigma)))
