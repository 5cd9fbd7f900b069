"""LCM multistep sampling (Luo et al. 2023, "Latent Consistency Models", alg. 3).

Each step maps x_t to the consistency function's estimate f(x_t, t) = c_skip(t) x_t +
c_out(t) x̂_0 (eq. 9 with c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²),
σ_d = 0.5, diffusers' `timestep_scaling = 10`) and re-noises it to the next timestep,
x' = sqrt(ᾱ') f + sqrt(1 - ᾱ') z; the last step returns f. Timesteps: `num_inference_steps`
evenly strided picks from the 50-step distillation schedule (19, 39, ..., 999), as diffusers'
LCMScheduler picks them. State [x]. img2img (`start` = k) runs steps k.. from
sqrt(ᾱ_k) x_0 + sqrt(1 - ᾱ_k) z, diffusers' `add_noise`.
"""
from __future__ import annotations

import numpy as np

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import alphas_cumprod, denoised
from sdrun.samplers.plan import Evaluation, Program

ORIGINAL_STEPS = 50  # the distillation schedule (diffusers `original_inference_steps`)
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def lcm_timesteps(steps: int, train_steps: int) -> np.ndarray:
    """(steps,) descending picks from the distillation schedule."""
    if steps > ORIGINAL_STEPS:
        raise UserError("Too many steps for LCM.",
                        expected=f"at most {ORIGINAL_STEPS}, the distillation schedule's length",
                        got=repr(steps), fix="use 2 to 8 steps, LCM's usual range")
    origin = (np.arange(1, ORIGINAL_STEPS + 1) * (train_steps // ORIGINAL_STEPS) - 1)[::-1]
    return origin[np.floor(np.linspace(0, ORIGINAL_STEPS, steps, endpoint=False)).astype(int)]


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) at timestep t: c_skip → 1, c_out → 0 as t → 0 (the boundary condition)."""
    scaled = t * TIMESTEP_SCALING
    return (SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2),
            scaled / np.sqrt(scaled**2 + SIGMA_DATA**2))


def _lcm_update(t, a_t, a_next, last: bool, p: Parameterization):
    c_skip, c_out = boundary_scalings(t)
    def update(state, y, z):
        (x,) = state
        f = c_skip * x + c_out * denoised(x, y, np.sqrt(a_t), np.sqrt(1.0 - a_t), p)
        return [f] if last else [np.sqrt(a_next) * f + np.sqrt(1.0 - a_next) * z]
    return update


def guidance_warning(guidance: float | None) -> tuple[str, ...]:
    """LCM is distilled to sample without classifier-free guidance: warn above 1 (LCM-LoRA 1–2)."""
    if guidance is None or guidance <= 1.0:
        return ()
    return (f"LCM was distilled to sample without classifier-free guidance; guidance scale "
            f"{guidance:g} > 1 tends to burn the image. Use 1.0 (1.0 to 2.0 with LCM-LoRA).",)


def lcm(schedule: DDPMSchedule, p: Parameterization, steps: int, guidance: float | None = None,
        start: int | None = None, **_) -> Program:
    """Latent consistency multistep sampling with fresh noise between steps."""
    alphas = alphas_cumprod(schedule)
    timesteps = lcm_timesteps(steps, len(alphas))
    a = alphas[timesteps]
    evaluations = [Evaluation(float(t), 1.0, _lcm_update(t, a[i], a[min(i + 1, steps - 1)],
                                                         i == steps - 1, p))
                   for i, t in enumerate(timesteps)]
    if start is None:
        return Program(1, tuple(evaluations), 1.0, guidance_warning(guidance))
    return Program(1, tuple(evaluations[start:]), float(np.sqrt(1.0 - a[start])),
                   guidance_warning(guidance), x0_scale=float(np.sqrt(a[start])))
