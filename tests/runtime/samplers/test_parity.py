"""Every registered sampler against the diffusers scheduler it reproduces, step by step."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers import SAMPLERS, make_plan, run_plan
from sdrun.samplers.discretize import alphas_cumprod

from tests.runtime.samplers.diffusers_reference import REFERENCES, reference_for, run_diffusers, stand_in_model

SD_SCHEDULE = DDPMSchedule(linear_start=0.00085, linear_end=0.012, timesteps=1000)
# Relative L2 of every step's latents against diffusers run in float64 on our (float64) ᾱ; its
# sigmas stay float32.
PARITY_RTOL = 1e-5
# Against stock diffusers: its ᾱ is a float32 cumprod, so s near t = 0 is off by up to ~3e-5
# relative; that alone exceeds 1e-5 wherever the last noise level is t = 0 (1 step, Heun at 2).
STOCK_RTOL = 1e-4
# Fractional (Karras) timesteps: diffusers interpolates float32 log-sigmas.
TIMESTEP_ATOL = 1e-2
STEP_COUNTS = (1, 2, 7, 20, 50)
SHAPE = (1, 4, 8, 8)

# Step counts where our default discretization is not diffusers' (ldm's for DDIM/PLMS: T % S != 0).
LDM_DISCRETIZATION = {"ddim": {7}, "plms": {7}}
# Where diffusers' scheduler is not our algorithm, with the reason; ldm's recurrence covers these.
NOT_DIFFUSERS = {
    ("plms", "v"): "PNDMScheduler combines raw v outputs before converting them to ε; ldm "
                   "converts each at its own latent (see test_plms_golden)",
}
TOO_FEW = {"plms": 1}  # PLMS's first step needs a next timestep; diffusers' degenerates to DDIM


def noises_for(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    return init, [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def relative_l2(ours, theirs) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def our_latents(sampler_id, parameterization, steps, init, noises, **options):
    plan = make_plan(sampler_id, SD_SCHEDULE, Parameterization(parameterization), steps, **options)
    latents = []
    run_plan(plan, stand_in_model, init.astype(np.float64), noises,
             callback=lambda e, x: latents.append(x))
    return plan, latents


def worst_parity(sampler_id, parameterization, steps, stock=False, **options):
    init, noises = noises_for(2 * steps + 2)
    plan, ours = our_latents(sampler_id, parameterization, steps, init, noises, **options)
    spacing = options.get("spacing")
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    scheduler, theirs, timesteps = run_diffusers(reference_for(sampler_id), parameterization,
                                                 steps, init, noises,
                                                 None if stock else alphas_cumprod(SD_SCHEDULE),
                                                 step_kwargs=_step_kwargs(options), **overrides)
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(plan.timesteps, timesteps, rtol=0, atol=TIMESTEP_ATOL)
    assert plan.init_scale == pytest.approx(float(scheduler.init_noise_sigma),
                                            rel=STOCK_RTOL if stock else 1e-6)
    return max(relative_l2(a, b) for a, b in zip(ours, theirs))


def _step_kwargs(options) -> dict:
    return {} if options.get("eta") is None else {"eta": options["eta"]}


def comparable_cases() -> list[tuple[str, int, str]]:
    """(sampler, steps, parameterization) where diffusers computes the same thing; the exclusions are
    tested elsewhere (ldm discretization: the leading-spacing test; PLMS with v: test_plms.py)."""
    return [(sampler_id, steps, parameterization)
            for sampler_id in SAMPLERS if sampler_id.removesuffix("_karras") in REFERENCES
            for steps in STEP_COUNTS for parameterization in ("eps", "v")
            if steps not in LDM_DISCRETIZATION.get(sampler_id, ())
            and (sampler_id, parameterization) not in NOT_DIFFUSERS and TOO_FEW.get(sampler_id) != steps]


@pytest.mark.parametrize("sampler_id, steps, parameterization", comparable_cases())
def test_matches_diffusers(sampler_id, steps, parameterization):
    worst = worst_parity(sampler_id, parameterization, steps)
    assert worst < PARITY_RTOL, f"worst step rel L2 {worst:.2e}, tolerance {PARITY_RTOL:.0e}"


@pytest.mark.parametrize("sampler_id, steps", [(sampler_id, steps) for sampler_id in sorted(LDM_DISCRETIZATION)
                                               for steps in STEP_COUNTS if TOO_FEW.get(sampler_id) != steps])
def test_leading_spacing_matches_diffusers(sampler_id, steps):
    worst = worst_parity(sampler_id, "eps", steps, spacing="leading")
    assert worst < PARITY_RTOL, f"worst step rel L2 {worst:.2e}, tolerance {PARITY_RTOL:.0e}"


@pytest.mark.parametrize("sampler_id", [s for s in SAMPLERS if s.removesuffix("_karras") in REFERENCES])
def test_matches_stock_diffusers(sampler_id):
    """diffusers' own float32 ᾱ: agreement to its float32 rounding."""
    worst = worst_parity(sampler_id, "eps", 20, stock=True)
    assert worst < STOCK_RTOL, f"worst step rel L2 {worst:.2e}, tolerance {STOCK_RTOL:.0e}"


def test_ddim_eta_matches_diffusers():
    worst = worst_parity("ddim", "eps", 20, eta=0.7)
    assert worst < PARITY_RTOL, f"worst step rel L2 {worst:.2e}, tolerance {PARITY_RTOL:.0e}"
