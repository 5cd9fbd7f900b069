"""img2img with every sampler end to end: our ONNX Runtime pipeline against diffusers' img2img pipeline.

The tiny recipe's fp32 bundle (random weights seed 0) and diffusers' `StableDiffusionImg2ImgPipeline`
built from the same components as the txt2img peer, the sampler's scheduler by `from_config` from SD's
DDIM configuration, the same image, strength and prompt: the decoded float images agree within 1e-3.
Both pipelines run their own VAE encoder; diffusers' three `randn_tensor` draws are handed ours, in our
generator's order (`sdrun.pipeline`): the posterior sample's noise (`DiagonalGaussianDistribution.sample`),
the forward noise (`prepare_latents`), then the scheduler's per-step noise, indexed by step from the
first kept step.
"""
from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import numpy as np
import pytest

from sdrun.gates import PEER_IMAGE
from sdrun.metrics import compare
from tests.runtime.test_sampler_pipeline import (DETERMINISTIC, GUIDANCE, NEGATIVE, PROMPT, SIZE, STEPS,
                                                 STOCHASTIC, diffusers_scheduler)

STRENGTH, SEED = 0.6, 11
LATENT = (1, 4, SIZE // 8, SIZE // 8)
# diffusers' PNDM img2img slices its timestep list [t0, t1, t1, t2, ...] past the duplicate, so every
# latent after its first step is fed one timestep off; we run ldm's PLMS afresh on the kept steps and
# compare with PNDM given those steps' own list (see `pndm_kept_timesteps`).
SAMPLERS = [s for s in DETERMINISTIC if s != "plms"] + STOCHASTIC + ["plms"]


@pytest.fixture(scope="module")
def peer(tiny_recipe):
    from benchmarks.peer import diffusers_pipeline_from_models
    from sdcompile.weights import RandomWeights, load_models

    return diffusers_pipeline_from_models(load_models(tiny_recipe, RandomWeights(0)), tiny_recipe)


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    from sdrun.session import load_pipeline

    return load_pipeline(tiny_bundle, "onnxruntime", step_fusion=False, img2img=True).pipeline


def input_image() -> np.ndarray:
    """(1, SIZE, SIZE, 3) float32 in [0, 1]: a smooth colour ramp, as diffusers takes numpy images."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    return np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)[None].astype(np.float32)


def our_draws(pipeline, sampler_id: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(posterior noise, forward noise, per-evaluation noises) as `default_rng(SEED)` draws them."""
    from sdrun.sampling import sampler_plan

    plan = sampler_plan(pipeline.recipe, sampler_id, STEPS, None, None, None, GUIDANCE, STRENGTH)
    rng = np.random.default_rng(SEED)
    posterior, forward = (rng.standard_normal(LATENT, dtype=np.float32) for _ in range(2))
    noises = [rng.standard_normal(LATENT, dtype=np.float32) if needed else np.zeros(LATENT, np.float32)
              for needed in plan.needs_noise]
    return posterior, forward, noises


def pndm_kept_timesteps(pipe, num_inference_steps, strength, device):
    """PNDM's own list for the kept steps t_k.. : [t_k, t_{k+1}, t_{k+1}, t_{k+2}, ...]."""
    import torch

    kept = min(int(num_inference_steps * strength), num_inference_steps)
    steps = pipe.scheduler._timesteps[::-1][num_inference_steps - kept:].copy()  # t_k, ..., t_{n-1}
    listed = np.concatenate([steps[:2], steps[1:]]) if len(steps) > 1 else steps
    pipe.scheduler.timesteps = torch.from_numpy(listed)
    return pipe.scheduler.timesteps, kept


def run_diffusers_img2img(peer, sampler_id, recipe, draws) -> np.ndarray:
    import diffusers
    import torch

    posterior, forward, noises = draws
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**peer.components)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler = diffusers_scheduler(sampler_id, recipe)
    from_step = lambda *a, **k: torch.from_numpy(noises[scheduler.step_index - (scheduler.begin_index or 0)])  # noqa: E731
    patches = [mock.patch("diffusers.models.autoencoders.vae.randn_tensor", lambda *a, **k: torch.from_numpy(posterior)),
               mock.patch.object(importlib.import_module(type(pipe).__module__), "randn_tensor",
                                 lambda *a, **k: torch.from_numpy(forward)),
               mock.patch.object(importlib.import_module(type(scheduler).__module__), "randn_tensor", from_step,
                                 create=True)]
    if sampler_id == "plms":
        patches.append(mock.patch.object(type(pipe), "get_timesteps", pndm_kept_timesteps))
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for patch in patches:
            stack.enter_context(patch)
        output = pipe(prompt=[PROMPT], negative_prompt=[NEGATIVE], image=input_image(), strength=STRENGTH,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0, output_type="np")
    return np.asarray(output.images, dtype=np.float32).transpose(0, 3, 1, 2) * 2.0 - 1.0


@pytest.mark.parametrize("sampler_id", SAMPLERS)
def test_onnxruntime_img2img_equals_diffusers_img2img(sampler_id, pipeline, peer, tiny_recipe):
    from sdrun.pipeline import GenerationRequest

    image = input_image().transpose(0, 3, 1, 2) * 2.0 - 1.0
    request = GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                                image=image, strength=STRENGTH, sampler=sampler_id, seed=SEED)
    ours = pipeline.generate(request)
    assert ours.timer.counts["graph:unet"] == len(our_draws(pipeline, sampler_id)[2])
    theirs = run_diffusers_img2img(peer, sampler_id, tiny_recipe, our_draws(pipeline, sampler_id))
    verdict = PEER_IMAGE.judge(f"{sampler_id} img2img vs diffusers",
                               compare(np.clip(ours.decoded, -1, 1), theirs, 2.0).to_dict())
    print(f"\n{verdict.describe()}")
    assert verdict.passed, verdict.describe()


def test_a_strength_that_leaves_no_step_exits_2_before_loading(tiny_bundle, tmp_path):
    from PIL import Image

    from sdrun.cli import main

    Image.fromarray((input_image()[0] * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "o.png"
    with pytest.raises(SystemExit) as exit_:
        main(["img2img", "--bundle", str(tiny_bundle), "--image", str(tmp_path / "in.png"), "--prompt", "x",
              "--steps", "4", "--strength", "0.2", "--sampler", "euler", "--backend", "onnxruntime",
              "--out", str(out)])
    assert exit_.value.code == 2 and not out.exists()
