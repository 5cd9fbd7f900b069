"""Requests batched into one denoising loop give each request its own image, as run alone."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.generation_request import batch_key
from sdrun.pipeline import GenerationRequest

PIXEL = 1  # uint8 levels: batched vs alone differ by ONNX Runtime's batched arithmetic at most


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    from sdrun.session import load_pipeline

    return load_pipeline(tiny_bundle, "onnxruntime", img2img=True).pipeline


@pytest.mark.parametrize("sampler,guidance", [("ddim", 7.5), ("euler_a", 7.5), ("dpmpp_2m_sde", 1.0)])
def test_each_request_of_a_batch_gets_the_image_it_gets_alone(pipeline, sampler, guidance):
    requests = [GenerationRequest(prompt, negative, steps=3, seed=seed, sampler=sampler, guidance=guidance)
                for prompt, negative, seed in (("a red circle", "", 1), ("a lighthouse at dawn", "blurry", 2),
                                               ("a red circle", "", 3))]
    batched = pipeline.generate_batch(requests)
    for request, result in zip(requests, batched):
        alone = pipeline.generate(request)
        assert result.request.seed == request.seed and result.images.shape == (1, 64, 64, 3)
        assert np.abs(result.images.astype(int) - alone.images).max() <= PIXEL
    assert np.abs(batched[0].images.astype(int) - batched[2].images).max() > 10  # seeds kept apart


def test_img2img_requests_batch_with_their_own_images(pipeline):
    rng = np.random.default_rng(0)
    images = [rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32) for _ in range(2)]
    requests = [GenerationRequest("a house", steps=4, seed=s, image=image, strength=0.5)
                for s, image in enumerate(images)]
    for request, result in zip(requests, pipeline.generate_batch(requests)):
        assert np.abs(result.images.astype(int) - pipeline.generate(request).images).max() <= PIXEL


def test_requests_of_different_kinds_or_too_many_images_are_refused(pipeline):
    base = pipeline.complete(GenerationRequest("a", steps=2))
    assert batch_key(base) == batch_key(dataclasses.replace(base, prompt="b", seed=9))
    with pytest.raises(ValueError, match="2 kinds"):
        pipeline.generate_batch([base, dataclasses.replace(base, steps=3)])
    with pytest.raises(UserError, match="exceed the bundle's batch profile"):
        pipeline.generate_batch([dataclasses.replace(base, batch=3)] * 2)
