"""The denoising loop of any sampler plan (`sdrun.samplers`), on the plain or the step-fused UNet.

Per model evaluation e the UNet sees c_in[e]·state[0] at the plan's (possibly fractional)
timestep, classifier-free guidance combines the two halves (Ho & Salimans 2022), and the plan's
linear update advances the state. With the plain UNet guidance and the update run on the host
(`run_plan`); the step-fused graph runs both (`run_fused`: one call per evaluation, its rows in
`StepFeeds`), and a backend may run that whole loop on its device (`ResidentLoop`, TensorRT).
Noise is drawn from the request's generator after the initial latents (img2img: after the
posterior and forward noise), one tensor per evaluation whose update takes noise. The conditioning is
what the UNet sees unchanged for a whole loop, by input name: `encoder_hidden_states` (2B, L, D) and,
for SDXL, `text_embeds` (2B, P) and `time_ids` (2B, 6), for an inpainting UNet `mask` (2B, 1, h, w) and
`masked_image_latents` (2B, 4, h, w); [uncond; cond] rows with guidance, cond without. The plain UNet takes
the inpainting inputs concatenated after its sample's channels (`INPAINT_CHANNELS` order), the step-fused
graph by name (it concatenates them itself). Inpainting with an ordinary UNet blends the latent on the
host after each evaluation (`sdrun.latent_blend`), on either loop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from sdrun.backends.base import GraphRunner
from sdrun.recipe import INPAINT_CHANNELS, Recipe
from sdrun.samplers import make_plan, resolve_sampler
from sdrun.samplers.plan import STATE_WIDTH, Plan, fused_update_rows, initial_state, run_plan

DEFAULT_SAMPLER = "ddim"
FUSED = "unet_step"
PER_EVALUATION = ("timestep", "input_scale", "guidance", "update", "noise")  # step-fused inputs, one row each


def sampler_plan(recipe: Recipe, sampler: str | None, steps: int, karras: bool | None, spacing: str | None,
                 eta: float | None, guidance: float, strength: float | None = None) -> Plan:
    """The plan of a request's sampler (None: DDIM); `eta` None: the sampler's default; `strength`: img2img."""
    return make_plan(resolve_sampler(sampler or DEFAULT_SAMPLER), recipe.schedule, recipe.parameterization, steps,
                     karras=karras, spacing=spacing, eta=eta, guidance=guidance, strength=strength)


def classifier_free_guidance(uncond: np.ndarray, cond: np.ndarray, scale: float) -> np.ndarray:
    """Guided model output uncond + scale·(cond - uncond) (Ho & Salimans 2022), for ε or v alike."""
    return uncond + scale * (cond - uncond)


def draw_noises(plan: Plan, shape: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray | None]:
    """One unit-variance (B, C, h, w) tensor per evaluation whose update takes noise, in order."""
    return [rng.standard_normal(shape, dtype=np.float32) if needed else None for needed in plan.needs_noise]


Conditioning = Mapping[str, np.ndarray]


def guided_model(unet: GraphRunner, conditioning: Conditioning, guidance: float) -> Callable:
    """(x_in, t) -> the guided UNet output: [uncond; cond] halves combined when guidance != 1."""
    guided = guidance != 1.0
    named = {name: rows for name, rows in conditioning.items() if name not in INPAINT_CHANNELS}
    channels = [conditioning[name] for name in INPAINT_CHANNELS if name in conditioning]

    def model(x_in: np.ndarray, timestep: float) -> np.ndarray:
        sample = np.concatenate([x_in, x_in]) if guided else x_in
        sample = np.concatenate([sample, *channels], axis=1) if channels else sample
        feeds = {"sample": sample.astype(np.float32), "timestep": np.array([timestep], np.float32), **named}
        output = unet.run(feeds)["latent"]
        return classifier_free_guidance(*np.split(output, 2), guidance) if guided else output.copy()

    return model


@dataclasses.dataclass(frozen=True)
class StepFeeds:
    """Everything the step-fused loop is fed, computed on the host before it starts."""

    state: np.ndarray  # (W, B, C, h, w) float32, the initial state padded to STATE_WIDTH
    conditioning: dict[str, np.ndarray]  # (2B, ...) float32 [uncond; cond], or [cond; cond] without guidance
    rows: dict[str, np.ndarray]  # PER_EVALUATION name -> (E, *shape) float32; row e feeds evaluation e

    def __len__(self) -> int:
        return len(self.rows["timestep"])

    def evaluation(self, e: int) -> dict[str, np.ndarray]:
        return {name: rows[e] for name, rows in self.rows.items()}


def step_feeds(plan: Plan, init_noise: np.ndarray, conditioning: Conditioning, guidance: float,
               noises: list[np.ndarray | None], x0: np.ndarray | None = None) -> StepFeeds:
    """The step-fused graph's inputs for every evaluation of `plan` (zero noise where none is drawn)."""
    state = np.zeros((STATE_WIDTH, *init_noise.shape), np.float32)
    state[:plan.width] = np.stack(initial_state(plan, init_noise.astype(np.float32), x0))
    if guidance == 1.0:  # the fused graph always guides
        conditioning = {name: np.concatenate([rows, rows]) for name, rows in conditioning.items()}
    zeros = np.zeros(init_noise.shape, np.float32)
    count = len(plan)
    rows = {"timestep": plan.timesteps.reshape(count, 1), "input_scale": plan.c_in.reshape(count, 1),
            "guidance": np.full((count, 1), guidance), "update": fused_update_rows(plan),
            "noise": np.stack([zeros if z is None else z for z in noises])}
    return StepFeeds(state, dict(conditioning), {name: np.ascontiguousarray(rows[name], np.float32) for name in PER_EVALUATION})


def run_fused(step: GraphRunner, feeds: StepFeeds, on_evaluation: Callable[[int, np.ndarray], None],
              blend: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The host-driven step-fused loop: one graph call per evaluation; the final latents (B, C, h, w).
    `blend(e, state[0])` replaces state[0] after evaluation e (inpainting's latent blending)."""
    state = feeds.state
    for e in range(len(feeds)):
        state = step.run({"state": state, **feeds.conditioning, **feeds.evaluation(e)})["next_state"].copy()
        if blend is not None:
            state[0] = blend(e, state[0])
        on_evaluation(e, state[0])
    return state[0]


def sample_plan(plan: Plan, runners: Mapping[str, GraphRunner], init_noise: np.ndarray, conditioning: Conditioning,
                guidance: float, noises: list[np.ndarray | None],
                on_evaluation: Callable[[int, np.ndarray], None], x0: np.ndarray | None = None,
                blend: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Final latents of `plan` from unit-variance `init_noise` (B, C, h, w) and, for img2img, the
    encoded image `x0` (B, C, h, w), on the step-fused UNet when `runners` has it, else the plain one;
    `blend` runs after each evaluation on either."""
    if FUSED in runners:
        return run_fused(runners[FUSED], step_feeds(plan, init_noise, conditioning, guidance, noises, x0),
                         on_evaluation, blend)
    model = guided_model(runners["unet"], conditioning, guidance)
    return run_plan(plan, model, init_noise, noises, on_evaluation, x0, blend).astype(np.float32)
