"""The host loop of any sampler plan (`sdrun.samplers`) over the plain UNet runner, with guidance.

DDIM at ldm's discretization keeps its own path (`sdrun.pipeline.denoise`), which the step-fused
graph also serves; every other sampler runs here: per model evaluation, the UNet sees
c_in·state[0] at the plan's (possibly fractional) timestep, classifier-free guidance combines the
two halves, and the plan's linear update advances the state. Noise is drawn from the request's
generator after the initial latents (img2img: after the posterior and forward noise), one tensor
per evaluation whose update takes noise.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from sdrun import schedulers
from sdrun.backends.base import GraphRunner
from sdrun.errors import UserError
from sdrun.recipe import Recipe
from sdrun.samplers import make_plan, resolve_sampler
from sdrun.samplers.plan import Plan, run_plan

LDM_DDIM = "ddim"


def is_planned(sampler: str | None, karras: bool | None, spacing: str | None) -> bool:
    """Whether a request runs through a sampler plan rather than ldm's DDIM path."""
    return resolve_sampler(sampler or LDM_DDIM).id != LDM_DDIM or bool(karras) or spacing is not None


def sampler_plan(recipe: Recipe, sampler: str | None, steps: int, karras: bool | None, spacing: str | None,
                 eta: float, guidance: float, strength: float | None = None) -> Plan:
    """The plan of the request's sampler; eta only where the sampler takes it (DDIM); `strength`: img2img."""
    chosen = resolve_sampler(sampler or LDM_DDIM)
    return make_plan(chosen, recipe.schedule, recipe.parameterization, steps, karras=karras, spacing=spacing,
                     eta=eta if chosen.id == LDM_DDIM else None, guidance=guidance, strength=strength)


def guided_model(unet: GraphRunner, context: np.ndarray, guidance: float) -> Callable:
    """(x_in, t) -> the guided UNet output: [uncond; cond] halves combined when guidance != 1."""
    guided = guidance != 1.0

    def model(x_in: np.ndarray, timestep: float) -> np.ndarray:
        sample = np.concatenate([x_in, x_in]) if guided else x_in
        feeds = {"sample": sample.astype(np.float32), "timestep": np.array([timestep], np.float32),
                 "encoder_hidden_states": context}
        output = unet.run(feeds)["latent"]
        return schedulers.classifier_free_guidance(*np.split(output, 2), guidance) if guided else output.copy()

    return model


def sample_plan(plan: Plan, runners: Mapping[str, GraphRunner], init_noise: np.ndarray, context: np.ndarray,
                guidance: float, rng: np.random.Generator, on_step=None, x0: np.ndarray | None = None) -> np.ndarray:
    """Final latents of `plan` from unit-variance `init_noise` (B, C, h, w) and, for img2img, the
    encoded image `x0` (B, C, h, w)."""
    if "unet" not in runners:
        raise UserError(f"the {plan.name} sampler runs with the plain UNet, and this pipeline loaded the "
                        "step-fused one only.", fix="load the pipeline with step_fusion=False (sdrun does for "
                                                    "samplers other than DDIM)")
    noises = [rng.standard_normal(init_noise.shape, dtype=np.float32) if needed else None
              for needed in plan.needs_noise]

    def progress(e: int, x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            raise UserError(f"non-finite values (NaN/inf) appeared at evaluation {e + 1}/{len(plan)} of "
                            f"{plan.name}.", fix="re-export in fp32, or keep more nodes in fp32 islands")
        if on_step:
            on_step(e + 1, len(plan))

    model = guided_model(runners["unet"], context, guidance)
    return run_plan(plan, model, init_noise, noises, progress, x0).astype(np.float32)
