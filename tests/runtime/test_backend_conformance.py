"""Every backend under one set of assertions: each component of the tiny bundle, then a short txt2img.

Runners are made the one way every caller makes them (`open_bundle` + `make_runners`). Eager
PyTorch (the `torch` backend) is the reference the others are gated against; TensorRT runs under
the `gpu` marker, where its engines are built first, and is skipped with the reason elsewhere.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.gpu_check import sample_feeds
from sdrun import gates
from sdrun.backends import BackendOptions, make_runners
from sdrun.bundle import Bundle, binding_from_feeds, open_bundle, resolve_shape
from sdrun.pipeline import GenerationRequest, Pipeline
from tests.trt.engine_bundles import engine_bundle

BACKENDS = [pytest.param("onnxruntime"), pytest.param("torch"), pytest.param("tensorrt", marks=pytest.mark.gpu)]
LEVELS = ("opt", "min", "max")
STEPS = 3
PLAIN = ("text_encoder", "unet", "vae_decoder")
FUSED = ("text_encoder", "unet_step", "vae_decoder")


@dataclasses.dataclass(frozen=True)
class Loaded:
    name: str
    bundle: Bundle
    runners: dict


def load(name: str, path) -> Loaded:
    bundle = open_bundle(path)
    return Loaded(name, bundle, make_runners(name, bundle, sorted(bundle.verified), BackendOptions()))


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_bundle, tmp_path_factory) -> Loaded:
    path = engine_bundle(tiny_bundle, tmp_path_factory.mktemp("engines")) if request.param == "tensorrt" \
        else tiny_bundle
    return load(request.param, path)


@pytest.fixture(scope="module")
def eager(tiny_bundle) -> Loaded:
    return load("torch", tiny_bundle)


def feeds_at(loaded: Loaded, component: str, level: str) -> dict[str, np.ndarray]:
    record = loaded.bundle.component(component)
    shapes = {name: levels[level] for name, levels in record.profile.items()}
    return sample_feeds(record, shapes, loaded.bundle.recipe.text_encoder.vocab_size, np.random.default_rng(0))


def gate_for(backend: str, output: str, precision: str) -> gates.Gate:
    from sdcompile.trt import BuildOptions  # what engine_bundle builds with

    return (gates.tensorrt_gate(output, precision, BuildOptions().tf32) if backend == "tensorrt"
            else gates.output_gate(output, precision))


@pytest.mark.parametrize("level", LEVELS)
def test_outputs_have_the_manifests_names_shapes_and_dtypes(backend, level):
    vae_scale = backend.bundle.recipe.vae_scale
    for name in sorted(backend.bundle.verified):
        record = backend.bundle.component(name)
        feeds = feeds_at(backend, name, level)
        outputs = backend.runners[name].run(feeds)
        binding = binding_from_feeds(record, feeds, vae_scale)
        assert list(outputs) == [spec.name for spec in record.outputs], name
        for spec in record.outputs:
            assert outputs[spec.name].shape == resolve_shape(spec.dims, binding), f"{name}.{spec.name}"
            assert outputs[spec.name].dtype == np.dtype(spec.dtype), f"{name}.{spec.name}"
            assert np.isfinite(outputs[spec.name]).all(), f"{name}.{spec.name}"


def test_every_component_matches_eager_pytorch_within_its_gate(backend, eager):
    for name in sorted(backend.bundle.verified):
        feeds = feeds_at(backend, name, "opt")
        expected = {k: v.copy() for k, v in eager.runners[name].run(feeds).items()}
        actual = backend.runners[name].run(feeds)
        precision = backend.bundle.component(name).precision
        for output, reference in expected.items():
            stats = gates.output_statistics(output, reference, actual[output])
            verdict = gate_for(backend.name, output, precision).judge(f"{backend.name} {name}: {output}", stats)
            assert verdict.passed, verdict.describe()


def test_the_same_feeds_give_the_same_outputs(backend):
    for name in sorted(backend.bundle.verified):
        feeds = feeds_at(backend, name, "opt")
        first = {k: v.copy() for k, v in backend.runners[name].run(feeds).items()}
        backend.runners[name].run(feeds_at(backend, name, "min"))  # another shape in between
        second = backend.runners[name].run(feeds)
        for output, value in first.items():
            np.testing.assert_array_equal(value, second[output], err_msg=f"{name}.{output}")


def test_runners_carry_the_command_that_rebuilds_them(backend):
    for name, runner in backend.runners.items():
        assert runner.rebuild_hint.startswith("sdcompile ") and name in runner.rebuild_hint


@pytest.mark.parametrize("components", [PLAIN, FUSED], ids=["plain", "step-fused"])
def test_txt2img_matches_eager_pytorch(backend, eager, components):
    request = GenerationRequest("a lighthouse on a cliff at dawn", "blurry", steps=STEPS, seed=3)
    images = [Pipeline(loaded.bundle, {n: loaded.runners[n] for n in components}).generate(request).images
              for loaded in (eager, backend)]
    assert images[1].shape == (1, 64, 64, 3) and images[1].dtype == np.uint8
    precision = backend.bundle.component("unet").precision
    stats = gates.output_statistics("images", images[0] / 255.0, images[1] / 255.0)
    verdict = gates.pipeline_image_gate(precision).judge(f"{backend.name} txt2img", stats)
    assert verdict.passed, verdict.describe()
