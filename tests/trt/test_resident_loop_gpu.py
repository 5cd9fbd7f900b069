"""The device-resident loop on a GPU: the same latents as the host loop over the same engines.

Needs TensorRT, CUDA Python and an NVIDIA GPU (the `gpu` marker); skipped with the reason elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.backends import BackendOptions, make_runners
from sdrun.bundle import open_bundle
from sdrun.metrics import compare
from sdrun.pipeline import GenerationRequest, Pipeline
from tests.trt.engine_bundles import engine_bundle

pytestmark = pytest.mark.gpu

COMPONENTS = ["text_encoder", "unet_step", "vae_decoder"]
MAX_REL_L2 = 1e-6  # same engines, same inputs: only the copies differ


class HostLoop:
    """A runner seen without its resident loop, so the pipeline steps it from the host."""

    def __init__(self, runner):
        self.runner, self.rebuild_hint = runner, runner.rebuild_hint

    def run(self, feeds):
        return self.runner.run(feeds)


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    from sdcompile.trt_profiles import ShapeMode, ShapeRequest

    path = engine_bundle(tiny_bundle, tmp_path_factory.mktemp("resident"), tuple(COMPONENTS),
                         ShapeRequest(ShapeMode.STATIC))
    return open_bundle(path, lambda manifest: COMPONENTS)


SAMPLERS = {"ddim": 0.5, "dpmpp_2m_sde_karras": None, "plms": None, "heun": None}  # sampler -> eta


def latents(bundle, options: BackendOptions, sampler: str, host_loop: bool = False) -> np.ndarray:
    runners = make_runners("tensorrt", bundle, COMPONENTS, options)
    if host_loop:
        runners["unet_step"] = HostLoop(runners["unet_step"])
    request = GenerationRequest("a lighthouse on a cliff at dawn", "blurry", steps=6, seed=1, sampler=sampler,
                                eta=SAMPLERS[sampler])
    return Pipeline(bundle, runners).generate(request).latents


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resident_loop_equals_the_host_loop(bundle, sampler):
    host = latents(bundle, BackendOptions(), sampler, host_loop=True)
    error = compare(host, latents(bundle, BackendOptions(), sampler)).rel_l2
    assert error <= MAX_REL_L2, f"rel L2 {error:.3g}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_graph_replay_equals_the_resident_loop(bundle, sampler):
    resident = latents(bundle, BackendOptions(), sampler)
    error = compare(resident, latents(bundle, BackendOptions(cuda_graph=True), sampler)).rel_l2
    assert error <= MAX_REL_L2, f"rel L2 {error:.3g}"
