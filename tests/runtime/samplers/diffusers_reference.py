"""Run a diffusers scheduler on a stand-in model with our noise, recording every step's latents."""
from __future__ import annotations

import dataclasses
import importlib
from unittest import mock

import numpy as np

# SD 1.5's published scheduler config (a DDIMScheduler's), which names no timestep spacing.
SD_DDIM_CONFIG = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
                      clip_sample=False, set_alpha_to_one=False)
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}


@dataclasses.dataclass(frozen=True)
class Reference:
    """A diffusers scheduler class with the config overrides that make it our sampler."""

    cls: str
    config: dict = dataclasses.field(default_factory=dict)
    noise: str = "none"  # "none" | "randn" (patched `randn_tensor`) | "variance_noise" (step kwarg)
    step_kwargs: dict = dataclasses.field(default_factory=dict)


REFERENCES = {
    "ddim": Reference("DDIMScheduler", noise="variance_noise"),
    "euler": Reference("EulerDiscreteScheduler"),
    "euler_a": Reference("EulerAncestralDiscreteScheduler", noise="randn"),
    "heun": Reference("HeunDiscreteScheduler"),
    "dpmpp_2m": Reference("DPMSolverMultistepScheduler",
                          dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_sde": Reference("DPMSolverMultistepScheduler",
                              dict(algorithm_type="sde-dpmsolver++", solver_order=2),
                              noise="variance_noise"),
    "unipc": Reference("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2)),
    "lcm": Reference("LCMScheduler", noise="randn"),
    "plms": Reference("PNDMScheduler", dict(skip_prk_steps=True)),
}

def reference_for(sampler_id: str) -> Reference:
    family = sampler_id.removesuffix("_karras")
    reference = REFERENCES[family]
    if sampler_id.endswith("_karras"):
        return Reference(reference.cls, dict(reference.config, use_karras_sigmas=True),
                         reference.noise, reference.step_kwargs)
    return reference


def stand_in_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic, nonlinear function of (x, t) in place of the UNet."""
    return 0.8 * np.tanh(x) + 0.15 * np.cos(t / 170.0) * x + 0.05 * np.sin(t / 60.0)


def make_scheduler(reference: Reference, parameterization: str, steps: int, exact_alphas=None,
                   **overrides):
    """`exact_alphas`: replace diffusers' float32 ᾱ by these (float64) before `set_timesteps`."""
    import diffusers
    import torch

    config = dict(SD_DDIM_CONFIG, prediction_type=PREDICTION_TYPE[parameterization])
    scheduler = getattr(diffusers, reference.cls).from_config(config, **reference.config,
                                                             **overrides)
    if exact_alphas is not None:
        scheduler.alphas_cumprod = torch.from_numpy(exact_alphas)
        if hasattr(scheduler, "final_alpha_cumprod"):
            scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(steps)
    return scheduler


def run_diffusers(reference: Reference, parameterization: str, steps: int, init_noise, noises,
                  exact_alphas=None, step_kwargs=None, **overrides):
    """(scheduler, [latents after each `step` call], [timesteps fed to the model])."""
    import torch

    scheduler = make_scheduler(reference, parameterization, steps, exact_alphas, **overrides)
    module = importlib.import_module(type(scheduler).__module__)
    current = {}
    fake = lambda *args, **kwargs: current["noise"].clone()  # noqa: E731
    x = torch.from_numpy(init_noise.astype(np.float64)) * scheduler.init_noise_sigma
    latents, timesteps = [], []
    with mock.patch.object(module, "randn_tensor", fake, create=True):
        for e, t in enumerate(scheduler.timesteps):
            current["noise"] = torch.from_numpy(noises[e].astype(np.float64))
            model_in = scheduler.scale_model_input(x, t).numpy().astype(np.float64)
            y = torch.from_numpy(stand_in_model(model_in, float(t)))
            kwargs = dict(reference.step_kwargs, **(step_kwargs or {}))
            if reference.noise == "variance_noise":
                kwargs["variance_noise"] = current["noise"]
            x = scheduler.step(y, t, x, **kwargs).prev_sample
            latents.append(x.numpy().astype(np.float64))
            timesteps.append(float(t))
    return scheduler, latents, timesteps
