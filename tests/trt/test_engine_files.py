"""Engine file names, manifest engine records, and every reason an engine is refused."""
from __future__ import annotations

import dataclasses
import json

import pytest

from sdcompile.recipes import load_recipe
from sdrun.bundle import MANIFEST_NAME, ComponentRecord, Manifest, TensorSpec, read_manifest, write_json_atomic
from sdrun.engine_files import (EngineRecord, StaleReason, check_input_shapes, engine_key, engine_path,
                                engine_verdict, file_verdict, manifest_with_engine, rebuild_command, sm_tag,
                                stale_engine_error, version_tag)
from sdrun.errors import USAGE_EXIT_CODE, UserError
from sdrun.gates import (FP32_IMAGE_OUTPUT, FP32_OUTPUT, TENSORRT_FP16_OUTPUT, TENSORRT_TF32_OUTPUT,
                         tensorrt_gate)

VERSION, H100 = "10.13.0.35", (9, 0)
ONNX_FILES = {"unet/model.onnx": "a" * 64, "unet/model.onnx.data": "b" * 64}
PROFILE = {"sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]},
           "timestep": {"min": [1], "opt": [1], "max": [1]}}


def unet_record(engines: dict | None = None, files: dict | None = None) -> ComponentRecord:
    return ComponentRecord(
        name="unet", graph="unet/model.onnx", files=dict(files or ONNX_FILES),
        inputs=(TensorSpec("sample", "float32", ("cfg_batch", 4, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", (1,))),
        outputs=(TensorSpec("latent", "float32", ("cfg_batch", 4, "latent_height", "latent_width")),),
        profile=PROFILE, precision="fp16", passes=("cleanup",), engines=dict(engines or {}))


def engine(version: str = VERSION, capability: str = "9.0", static: bool = False, **changes) -> EngineRecord:
    record = EngineRecord(file=engine_path("unet", version, (int(capability[0]), int(capability[-1]))),
                          sha256="c" * 64, tensorrt_version=version, compute_capability=capability,
                          profile=PROFILE, onnx_sha256=dict(ONNX_FILES), build_seconds=12.5, static=static,
                          builder={"device": "NVIDIA H100", "optimization_level": None, "max_workspace": None,
                                   "attention": "decomposed", "tf32": False})
    return dataclasses.replace(record, **changes)


def manifest(component: ComponentRecord) -> Manifest:
    return Manifest(recipe=load_recipe("tiny"), source={"kind": "random", "seed": 0}, weights_sha256="d" * 64,
                    tokenizer={}, components={component.name: component}, tools={})


def with_engines(*records: EngineRecord) -> ComponentRecord:
    result = manifest(unet_record())
    for record in records:
        result = manifest_with_engine(result, "unet", record)
    return result.components["unet"]


def test_names_carry_tensorrt_version_and_compute_capability():
    assert engine_path("unet", "10.13.0.35", (9, 0)) == "unet/engine-trt10.13.0-sm90.plan"
    assert engine_key("11.1.0.7", (12, 0)) == "trt11.1.0-sm120"
    assert engine_key("10.8", (8, 6)) == "trt10.8.0-sm86"
    assert version_tag("10.13.3.9") == "10.13.3" and sm_tag((8, 9)) == "sm89"
    with pytest.raises(ValueError):
        version_tag("unknown")


def test_engine_record_round_trips_through_json():
    record = engine()
    data = json.loads(json.dumps(record.to_dict()))
    assert EngineRecord.from_dict(data) == record
    assert {"file", "tensorrt_version", "compute_capability", "profile", "onnx_sha256", "build_seconds",
            "static"} <= set(data)


def test_engine_record_says_how_attention_and_fp32_were_built():
    assert (engine().attention, engine().tf32) == ("decomposed", False)
    assert (engine(builder={"tf32": True}).attention, engine(builder={"tf32": True}).tf32) == ("fused", True)


def test_records_written_before_the_choices_read_as_what_they_were_built_with():
    """Before: the bundle's graph was parsed as it is (fused Attention) with TensorRT's default, TF32 on."""
    old = engine().to_dict()
    old["builder"] = {"device": "NVIDIA H100", "optimization_level": None, "max_workspace": None}
    record = EngineRecord.from_dict(json.loads(json.dumps(old)))
    assert (record.attention, record.tf32) == ("fused", True)
    assert engine_verdict(with_engines(record), VERSION, H100).usable


def test_fp32_engines_without_tf32_face_the_onnxruntime_fp32_gates():
    assert tensorrt_gate("latent", "fp32", engine().tf32) == FP32_OUTPUT
    assert tensorrt_gate("images", "fp32", engine().tf32) == FP32_IMAGE_OUTPUT
    assert tensorrt_gate("latent", "fp32", engine(builder={}).tf32) == TENSORRT_TF32_OUTPUT
    assert tensorrt_gate("images", "fp16", False) == tensorrt_gate("latent", "fp16", True) == TENSORRT_FP16_OUTPUT


def test_manifest_gains_replaces_and_keeps_engines(tmp_path):
    original = manifest(unet_record())
    first = manifest_with_engine(original, "unet", engine())
    other_gpu = manifest_with_engine(first, "unet", engine(capability="8.6"))
    rebuilt = manifest_with_engine(other_gpu, "unet", engine(build_seconds=3.0))
    engines = rebuilt.components["unet"].engines
    assert original.components["unet"].engines == {}
    assert set(engines) == {"trt10.13.0-sm90", "trt10.13.0-sm86"}
    assert engines["trt10.13.0-sm90"]["build_seconds"] == 3.0
    write_json_atomic(tmp_path / MANIFEST_NAME, rebuilt.to_dict())
    assert read_manifest(tmp_path).components["unet"].engines == engines


def test_usable_engine():
    verdict = engine_verdict(with_engines(engine()), VERSION, H100)
    assert verdict.usable and verdict.record == engine()
    assert file_verdict(verdict, "c" * 64).usable


@pytest.mark.parametrize(("component", "version", "capability", "reason"), [
    (unet_record(), VERSION, H100, StaleReason.NOT_BUILT),
    (with_engines(engine("10.12.0.36")), VERSION, H100, StaleReason.OTHER_TENSORRT),
    (with_engines(engine("10.13.0.30")), VERSION, H100, StaleReason.OTHER_TENSORRT),
    (with_engines(engine(capability="8.6")), VERSION, H100, StaleReason.OTHER_GPU),
    (with_engines(engine(onnx_sha256={"unet/model.onnx": "e" * 64})), VERSION, H100, StaleReason.ONNX_CHANGED),
    (unet_record(engines={"trt10.13.0-sm90": {"file": "unet/x.plan"}}), VERSION, H100, StaleReason.MALFORMED),
])
def test_stale_engine_reasons(component, version, capability, reason):
    verdict = engine_verdict(component, version, capability)
    assert not verdict.usable and verdict.reason is reason
    assert file_verdict(verdict, "c" * 64) == verdict  # a manifest refusal stands whatever the file


def test_other_gpu_names_what_was_built():
    verdict = engine_verdict(with_engines(engine(capability="8.6")), VERSION, H100)
    assert "trt10.13.0-sm86" in verdict.detail and "9.0" in verdict.detail


def test_changed_onnx_names_the_files():
    verdict = engine_verdict(with_engines(engine()), VERSION, H100)
    changed = engine_verdict(dataclasses.replace(with_engines(engine()), files={"unet/model.onnx": "f" * 64}),
                             VERSION, H100)
    assert verdict.usable
    assert changed.reason is StaleReason.ONNX_CHANGED
    assert "unet/model.onnx" in changed.detail and "unet/model.onnx.data" in changed.detail


def test_engine_file_missing_or_changed():
    verdict = engine_verdict(with_engines(engine()), VERSION, H100)
    assert file_verdict(verdict, None).reason is StaleReason.FILE_MISSING
    assert file_verdict(verdict, "0" * 64).reason is StaleReason.FILE_CHANGED


def test_refusal_names_the_rebuild_command():
    verdict = engine_verdict(with_engines(engine("10.12.0.36", static=True)), VERSION, H100)
    error = stale_engine_error("my bundle", verdict)
    assert error.exit_code == USAGE_EXIT_CODE
    assert "another TensorRT version" in error.message()
    assert "sdcompile build-trt 'my bundle' --component unet" in error.message()
    static = engine_verdict(with_engines(engine(static=True, onnx_sha256={})), VERSION, H100)
    assert rebuild_command("b", "unet", static=True) in stale_engine_error("b", static).message()


def test_input_shapes_inside_the_profile_pass():
    check_input_shapes("unet", {"sample": (2, 4, 8, 8), "timestep": (1,)}, PROFILE, rebuild_command("b", "unet"))
    check_input_shapes("unet", {"sample": (8, 4, 16, 16), "timestep": (1,)}, PROFILE, rebuild_command("b", "unet"))


@pytest.mark.parametrize("shape", [(16, 4, 8, 8), (2, 4, 2, 8), (2, 4, 8)])
def test_input_shapes_outside_the_profile_are_refused(shape):
    with pytest.raises(UserError, match="'sample' of unet") as caught:
        check_input_shapes("unet", {"sample": shape, "timestep": (1,)}, PROFILE, rebuild_command("b", "unet"))
    assert "[1, 4, 4, 4] and [8, 4, 16, 16]" in caught.value.message()
    assert "sdcompile build-trt b --component unet" in caught.value.message()
