"""UniPC (Zhao et al. 2023), data prediction, B(h) = e^h - 1 ("bh2"), order 2.

With m = x̂_0 estimates, h = λ_t - λ_s, hh = -h and φ-functions of hh:
  UniP (predictor):  x_t = (σ_t/σ_s) x - α_t (e^{hh} - 1) m_s - α_t B(h) ρ_p D_1,
                     D_1 = (m_prev - m_s) / r,  r = (λ_prev - λ_s) / h,  ρ_p = 1/2
  UniC (corrector):  redoes the previous step from its start x_last once m at its end is known,
                     x_c = (σ_t/σ_s) x_last - α_t (e^{hh} - 1) m_s - α_t B(h) (Σ ρ_k D_k + ρ_t (m_t - m_s)),
                     ρ solving R ρ = b (Zhao et al. 2023, alg. 2; ρ = 1/2 at order 1).
The UNet sees the predictor's output; the corrected latent is what the next predictor starts
from. Orders warm up (1, 2, 2, ...) and the last step is first order (`lower_order_final`).
State [x, x_last, m_prev, m_prev2]; timesteps as diffusers' UniPCMultistepScheduler. img2img
(`start` = k) runs steps k.. from α_k x_0 + σ_k z; the warm-up counts from step k, and step k
has no corrector, as diffusers' `lower_order_nums` and `last_sample` start afresh there.
"""
from __future__ import annotations

import numpy as np

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.discretize import Spacing, denoised, vp_coefficients
from sdrun.samplers.dpm_solver import log_snr_step, multistep_schedule, vp_program
from sdrun.samplers.plan import Evaluation, Program

ORDER = 2


def corrector_rhos(r: float | None, hh: float) -> np.ndarray:
    """ρ for UniC: order 1 → [1/2]; order 2 → solve [[1, 1], [r, 1]] ρ = b (bh2)."""
    if r is None:
        return np.array([0.5])
    b_h = np.expm1(hh)
    h_phi_k, factorial, b = np.expm1(hh) / hh - 1.0, 1, []
    for i in range(1, ORDER + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array(b))


def _unip(sigmas, i: int, order: int):
    """Coefficients (c_x, c_m, c_prev) of x_t = c_x x + c_m m_s + c_prev m_prev."""
    s, s_t = sigmas[i], sigmas[i + 1]
    (_, sigma_s), (alpha_t, sigma_t) = vp_coefficients(s), vp_coefficients(s_t)
    phi = s_t / s - 1.0  # e^{hh} - 1 = B(h)
    c_x, c_m, c_prev = sigma_t / sigma_s, -alpha_t * phi, 0.0
    if order == 2:
        r = log_snr_step(s, sigmas[i - 1]) / log_snr_step(s, s_t)  # (λ_prev - λ_s) / h
        d1 = 0.5 * alpha_t * phi / r  # -α_t B(h) ρ_p (m_prev - m_s) / r
        c_m, c_prev = c_m + d1, -d1
    return c_x, c_m, c_prev


def _unic(sigmas, i: int, order: int):
    """Coefficients (c_x, c_m, c_prev2, c_t) of x_c = c_x x_last + c_m m_s + c_prev2 m_prev2 + c_t m_t."""
    s, s_t = sigmas[i - 1], sigmas[i]
    (_, sigma_s), (alpha_t, sigma_t) = vp_coefficients(s), vp_coefficients(s_t)
    h = log_snr_step(s, s_t)
    r = log_snr_step(s, sigmas[i - 2]) / h if order == 2 else None
    rhos = corrector_rhos(r, -h)
    scale = -alpha_t * np.expm1(-h)  # -α_t B(h), also -α_t (e^{hh} - 1)
    c_prev2 = scale * rhos[0] / r if order == 2 else 0.0
    return sigma_t / sigma_s, scale - c_prev2 - scale * rhos[-1], c_prev2, scale * rhos[-1]


def predictor_order(i: int, n: int, first: int = 0) -> int:
    """Warm-up from the first step run and lower_order_final: min(ORDER, i - first + 1, n - i)."""
    return min(ORDER, i - first + 1, n - i)


def _update(sigmas, i: int, n: int, p: Parameterization, first: int = 0):
    alpha, sigma = vp_coefficients(sigmas[i])
    corrector = _unic(sigmas, i, predictor_order(i - 1, n, first)) if i > first else None
    predictor = _unip(sigmas, i, predictor_order(i, n, first))

    def update(state, y, z):
        x, x_last, m_prev, m_prev2 = state
        m = denoised(x, y, alpha, sigma, p)
        if corrector is not None:
            c_x, c_m, c_prev2, c_t = corrector
            x = c_x * x_last + c_m * m_prev + c_prev2 * m_prev2 + c_t * m
        c_x, c_m, c_prev = predictor
        return [c_x * x + c_m * m + c_prev * m_prev, x, m, m_prev]
    return update


def unipc(schedule: DDPMSchedule, p: Parameterization, steps: int, spacing: Spacing,
          karras: bool, start: int | None = None, **_) -> Program:
    """UniPC-bh2 of order 2 (predictor UniP-2, corrector UniC)."""
    timesteps, sigmas = multistep_schedule(schedule, steps, spacing, karras)
    n, first = len(timesteps), start or 0
    evaluations = [Evaluation(timesteps[i], 1.0, _update(sigmas, i, n, p, first))
                   for i in range(first, n)]
    return vp_program(4, evaluations, sigmas, start)
