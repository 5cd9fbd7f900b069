"""TensorRT on a GPU: build the tiny bundle's engines, run them, compare with ONNX Runtime CPU.

Needs TensorRT, CUDA Python and an NVIDIA GPU; skipped with the reason elsewhere. The `gpu`
marker keeps these out of the default tier.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrun.backends import BackendOptions, make_runners
from sdrun.bundle import MANIFEST_NAME, open_bundle, read_manifest, sha256_file
from sdrun.errors import UserError
from sdrun.gates import tensorrt_gate

pytestmark = pytest.mark.gpu

CPU = BackendOptions(providers=("CPUExecutionProvider",))


def runners(backend: str, bundle, components: list[str], options: BackendOptions = BackendOptions()) -> dict:
    """Runners made the one way every caller makes them: open the bundle, ask the registry."""
    return make_runners(backend, open_bundle(bundle, lambda manifest: components), components, options)


def require_tensorrt() -> None:
    """Skip with the reason. (`pytest.importorskip("tensorrt")` is not enough: type stubs import too.)"""
    from sdrun.backends.tensorrt import tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        pytest.skip(reason)


def identity():
    from sdrun.backends.tensorrt import Cuda, import_cudart, import_tensorrt

    return import_tensorrt().__version__, Cuda(import_cudart()).compute_capability()


def build(bundle, components=("all",), **options):
    from sdcompile.trt import BuildOptions, BuildRequest, build_engines

    return build_engines(BuildRequest(bundle, components, BuildOptions(**options)), log=lambda line: None)


def feeds_at(record, level: str, profile: dict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in record.inputs:
        shape = tuple(profile[spec.name][level])
        if np.dtype(spec.dtype).kind == "i":
            feeds[spec.name] = rng.integers(0, vocab_size, size=shape).astype(spec.dtype)
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500.0, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def bundle(request, tmp_path_factory):
    require_tensorrt()
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.options import Precision
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    path = tmp_path_factory.mktemp(f"trt-{request.param}") / "bundle"
    export_bundle(ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=path,
                               precision=Precision(request.param)), log=lambda line: None)
    build(path)
    return path


def copy_of(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_every_engine_is_recorded_with_its_origin(bundle):
    from sdrun.engine_files import engine_key

    version, capability = identity()
    manifest = read_manifest(bundle)
    for name, record in manifest.components.items():
        engine = record.engines[engine_key(version, capability)]
        assert (bundle / engine["file"]).is_file()
        assert sha256_file(bundle / engine["file"]) == engine["sha256"]
        assert engine["tensorrt_version"] == version and engine["onnx_sha256"] == record.files
        assert engine["static"] is False and engine["build_seconds"] > 0
        assert set(engine["profile"]) == {s.name for s in record.inputs}


def test_tensorrt_matches_onnxruntime_per_component(bundle):
    from sdrun.engine_files import EngineRecord, engine_key
    from sdrun.gates import output_statistics

    manifest = read_manifest(bundle)
    names = list(manifest.components)
    engines, references = runners("tensorrt", bundle, names), runners("onnxruntime", bundle, names, CPU)
    vocab = manifest.recipe.text_encoder.vocab_size
    for name, record in manifest.components.items():
        feeds = feeds_at(record, "opt", engines[name].profile, vocab)
        reference = references[name].run(feeds)
        result = engines[name].run(feeds)
        for output, expected in reference.items():
            assert result[output].shape == expected.shape and result[output].dtype == expected.dtype
            tf32 = EngineRecord.from_dict(record.engines[engine_key(*identity())]).tf32
            verdict = tensorrt_gate(output, record.precision, tf32).judge(
                f"{name}.{output}", output_statistics(output, expected, result[output]))
            assert verdict.passed, verdict.describe()


def test_dynamic_engine_takes_min_and_max_and_refuses_beyond(bundle):
    manifest = read_manifest(bundle)
    runner = runners("tensorrt", bundle, ["vae_decoder"])["vae_decoder"]
    record = manifest.components["vae_decoder"]
    for level in ("min", "max", "opt", "min"):  # back to a shape seen before: its buffers are reused
        feeds = feeds_at(record, level, runner.profile, 0)
        batch, _, h, w = feeds["latent"].shape
        assert runner.run(feeds)["images"].shape == (batch, 3, 8 * h, 8 * w)
    too_big = {"latent": np.zeros([d + 1 for d in runner.profile["latent"]["max"]], dtype=np.float32)}
    with pytest.raises(UserError, match="sdcompile build-trt"):
        runner.run(too_big)


def test_engine_from_another_tensorrt_is_refused(bundle, tmp_path):
    from sdrun.engine_files import engine_key

    copy = copy_of(bundle, tmp_path)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["components"]["unet"]["engines"][engine_key(*identity())]["tensorrt_version"] = "10.0.0.1"
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match="another TensorRT version") as caught:
        runners("tensorrt", copy, ["unet"])
    assert "sdcompile build-trt" in caught.value.message() and "--component unet" in caught.value.message()


def test_changed_engine_file_is_refused(bundle, tmp_path):
    from sdrun.engine_files import engine_path

    copy = copy_of(bundle, tmp_path)
    plan = copy / engine_path("vae_decoder", *identity())
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest"):
        runners("tensorrt", copy, ["vae_decoder"])


def test_static_engine_serves_only_its_shape(bundle, tmp_path):
    from sdcompile.trt_profiles import ShapeMode, ShapeRequest

    copy = copy_of(bundle, tmp_path)
    build(copy, ("vae_decoder",), shapes=ShapeRequest(ShapeMode.STATIC, {"opt": {"batch": 2}}))
    runner = runners("tensorrt", copy, ["vae_decoder"])["vae_decoder"]
    assert runner.profile["latent"]["min"] == runner.profile["latent"]["max"] == [2, 4, 8, 8]
    assert runner.run({"latent": np.zeros((2, 4, 8, 8), np.float32)})["images"].shape == (2, 3, 64, 64)
    with pytest.raises(UserError, match="was not built for"):
        runner.run({"latent": np.zeros((1, 4, 8, 8), np.float32)})


def test_timing_cache_is_written_and_reused(bundle, tmp_path):
    copy = copy_of(bundle, tmp_path)
    cache = tmp_path / "timing.cache"
    build(copy, ("text_encoder",), timing_cache=cache)
    first = cache.stat().st_size
    build(copy, ("text_encoder",), timing_cache=cache, optimization_level=1)
    assert first > 0 and cache.stat().st_size >= first
