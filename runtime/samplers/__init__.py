"""Samplers as data: (training schedule, parameterization, steps, options) -> a `Plan`.

The contract. Every sampler here is a linear recurrence over a small state S = [x, m_1..m_K]
(x the latent the UNet sees next, m_k what the method remembers). With y_e the (guided) model
output at evaluation e and z_e unit noise,

    S_{e+1} = A_e [S_e ; y_e] + b_e z_e,        UNet input c_in,e · x_e at timestep t_e.

Linearity holds because each method is a linear combination of the latent and of denoised
estimates D, and D is itself linear in (x, y) for a fixed noise level (ε: D = (x - σy)/α,
v: D = αx - σy, in the VP latent x = αx_0 + σε), so the parameterization folds into A_e:
- DDIM (Song et al. 2021, eq. 12): x' = sqrt(ᾱ')·D + sqrt(1 - ᾱ' - σ²)·ε̂ + σz, K = 0.
- PLMS (Liu et al. 2022, PNDM eq. 12 with ldm's pseudo improved-Euler first step): x' is DDIM's
  with ε̂ replaced by the Adams–Bashforth combination of the last four ε̂, K = 4.
- Euler / Euler ancestral / Heun (Karras et al. 2022, alg. 1; k-diffusion): in x/α = x_0 + sε,
  x' = x + (s_down - s)(x - D)/s + s_up z; Heun keeps its start point and slope, K = 2.
- DPM++ 2M and 2M SDE (Lu et al. 2022, DPM-Solver++ alg. 2 and its SDE variant):
  x' = (σ'/σ)e^{-ηh}x + α'(1 - e^{-(1+η)h})(D + (D - D_prev)/(2r)) [+ σ' sqrt(1 - e^{-2h}) z], K = 1.
- UniPC bh2 (Zhao et al. 2023): predictor as DPM++ with the UniP coefficients, corrector UniC
  rewrites the previous step with the new D before predicting, K = 3 (x_last, D_prev, D_prev2).
- LCM (Luo et al. 2023): x' = sqrt(ᾱ')(c_skip x + c_out D) + sqrt(1 - ᾱ') z, K = 0.

The initial state is [init_scale · z_init, 0, ...] with `init_scale` diffusers' `init_noise_sigma`,
so one unit-variance noise file reproduces a run under any sampler; there is no RNG inside.
Timesteps follow diffusers' schedulers built with `from_config` from SD's published DDIM config
(their per-scheduler default spacing); DDIM and PLMS default to ldm's uniform discretization.
"""
from __future__ import annotations

from sdrun.samplers.plan import (Evaluation, Plan, Program, apply_plan_step, build_plan,
                                 initial_state, model_input, run_plan, run_program)
from sdrun.samplers.registry import (SAMPLERS, Sampler, make_plan, make_program,
                                     resolve_sampler, sampler_names)

__all__ = ["Evaluation", "Plan", "Program", "SAMPLERS", "Sampler", "apply_plan_step",
           "build_plan", "initial_state", "make_plan", "make_program", "model_input",
           "resolve_sampler", "run_plan", "run_program", "sampler_names"]
