"""One step-fused graph serves every sampler: its latents equal the plain UNet's host loop.

The tiny fp32 bundle and the tiny-xl twin (SDXL: its added conditioning passes through the step graph)
on ONNX Runtime, each loaded twice (plain `unet` with guidance and the update on
the host; `unet_step` with both inside the graph), the same request under every registered
sampler: the final latents agree within 1e-5 relative L2, with and without guidance, txt2img
and img2img.
"""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.metrics import compare
from sdrun.samplers import SAMPLERS

MAX_REL_L2 = 1e-5
STEPS = 7
ETA = {"ddim": 0.5}  # the only sampler that takes eta; the stochastic path of DDIM


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def pipelines(request, released_twin):
    from sdrun.session import load_pipeline

    bundle = request.getfixturevalue("tiny_bundle") if request.param == "tiny" else released_twin(request.param).bundle
    return {fused: load_pipeline(bundle, "onnxruntime", step_fusion=fused, img2img=True).pipeline
            for fused in (False, True)}


def latents(pipelines, fused: bool, **options) -> np.ndarray:
    from sdrun.pipeline import GenerationRequest

    result = pipelines[fused].generate(GenerationRequest("a lighthouse on a cliff at dawn", "blurry", seed=3,
                                                         steps=STEPS, **options))
    assert result.step_fused is fused
    return result.latents


def assert_fused_equals_plain(pipelines, **options) -> None:
    error = compare(latents(pipelines, True, **options), latents(pipelines, False, **options)).rel_l2
    print(f"\n{options.get('sampler')} guidance {options['guidance']}: rel L2 {error:.3g}")
    assert error <= MAX_REL_L2, f"{options}: rel L2 {error:.3g}"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_step_fused_equals_plain_for_every_sampler(pipelines, sampler):
    assert_fused_equals_plain(pipelines, sampler=sampler, guidance=7.5, eta=ETA.get(sampler))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde_karras", "plms"])
def test_step_fused_equals_plain_without_guidance(pipelines, sampler):
    assert_fused_equals_plain(pipelines, sampler=sampler, guidance=1.0)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "unipc_karras"])
def test_step_fused_equals_plain_for_img2img(pipelines, sampler):
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    assert_fused_equals_plain(pipelines, sampler=sampler, guidance=7.5, image=image, strength=0.6)
