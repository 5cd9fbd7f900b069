"""PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") as ldm's
`plms.py` runs it.

Each step is the DDIM (η = 0) transfer x_t -> x_{t-1} with ε̂ replaced by a linear multistep
combination of the last ε̂ (Adams–Bashforth, PNDM eq. 12): (3e_0 - e_1)/2, (23e_0 - 16e_1 +
5e_2)/12, then (55e_0 - 59e_1 + 37e_2 - 9e_3)/24. The first step has no history: ldm takes a
pseudo improved-Euler step instead — predict x_{t-1} with ε̂_t, evaluate ε̂ there at the next
timestep, and redo the step from x_t with the mean of both. ε̂ of a v-model is converted at
each evaluation's own latent and timestep. State [x, x_start, e_1, e_2, e_3]. img2img (`start`
= k) runs PLMS afresh on steps k.. (the pseudo improved-Euler step first) from sqrt(ᾱ_k) x_0 +
sqrt(1 - ᾱ_k) z; diffusers' PNDM img2img instead slices its duplicated-timestep list and so feeds
every later latent one timestep off.
"""
from __future__ import annotations

import numpy as np

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.ddim import ddim_alphas
from sdrun.samplers.discretize import Spacing, predicted_eps
from sdrun.samplers.plan import Evaluation, Program

ADAMS_BASHFORTH = {0: (1.0,), 1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12),
                   3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}  # by the number of past ε̂


def _transfer(a_t, a_prev):
    """(c_x, c_eps): DDIM η = 0, x_{t-1} = c_x x_t + c_eps ε̂ (PNDM eq. 9)."""
    return np.sqrt(a_prev / a_t), np.sqrt(1.0 - a_prev) - np.sqrt(a_prev * (1.0 - a_t) / a_t)


def _eps(x, y, a, p):
    return predicted_eps(x, y, np.sqrt(a), np.sqrt(1.0 - a), p)


def _first_predict(a_t, a_prev, p):
    c_x, c_eps = _transfer(a_t, a_prev)
    def update(state, y, z):
        x, zero = state[0], 0.0 * state[0]
        e = _eps(x, y, a_t, p)
        return [c_x * x + c_eps * e, x, e, zero, zero]
    return update


def _first_correct(a_t, a_prev, a_next, p):
    c_x, c_eps = _transfer(a_t, a_prev)
    def update(state, y, z):
        x, x_start, e_first = state[0], state[1], state[2]
        e_mean = 0.5 * (e_first + _eps(x, y, a_next, p))
        return [c_x * x_start + c_eps * e_mean, 0.0 * x, e_first, 0.0 * x, 0.0 * x]
    return update


def _multistep(a_t, a_prev, history: int, p):
    c_x, c_eps = _transfer(a_t, a_prev)
    weights = ADAMS_BASHFORTH[history]
    def update(state, y, z):
        x, past = state[0], state[2:]
        e = _eps(x, y, a_t, p)
        e_combined = sum(w * e_k for w, e_k in zip(weights, [e] + list(past)))
        return [c_x * x + c_eps * e_combined, 0.0 * x, e, past[0], past[1]]
    return update


def plms(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing | None,
         start: int | None = None, **_) -> Program:
    """ldm's PLMS sampler (`p_sample_plms`), ldm's timesteps unless a spacing is given."""
    timesteps, a_t, a_prev = (column[start or 0:] for column in ddim_alphas(schedule, steps, spacing))
    n = len(timesteps)
    evaluations = [Evaluation(timesteps[0], 1.0, _first_predict(a_t[0], a_prev[0], p)),
                   Evaluation(timesteps[min(1, n - 1)], 1.0,
                              _first_correct(a_t[0], a_prev[0], a_t[min(1, n - 1)], p))]
    evaluations += [Evaluation(timesteps[i], 1.0, _multistep(a_t[i], a_prev[i], min(i, 3), p))
                    for i in range(1, n)]
    if start is None:
        return Program(5, tuple(evaluations), 1.0)
    return Program(5, tuple(evaluations), float(np.sqrt(1.0 - a_t[0])), x0_scale=float(np.sqrt(a_t[0])))
