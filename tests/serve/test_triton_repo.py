"""`sdcompile triton-repo`: the python repository runs on PyTriton's tritonserver and its `pipeline` model
draws what `sdrun txt2img` draws; every config.pbtxt parses with Triton's schema and states exactly the
graph's (or the engine profile's) inputs and outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient", reason="tritonclient (the serve extra) is not installed")

from sdcompile.cli import cli  # noqa: E402
from sdcompile.triton_repo import ComponentKind, component_config  # noqa: E402

PIXEL = 1
COMPONENTS = ("text_encoder", "unet_step", "vae_decoder")
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64"}


def parsed(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def tensors(config, field: str) -> list[tuple[str, str, list[int]]]:
    from tritonclient.grpc import model_config_pb2

    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, field)]


def graph_tensors(values) -> list[tuple[str, str, list[int]]]:
    return [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type],
             [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]) for v in values]


def write(bundle, out, kind: str):
    result = CliRunner().invoke(cli, ["triton-repo", str(bundle), "--out", str(out), "--components", kind])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("fixture", ["tiny_bundle", "tiny_bundle_fp16"])
def test_onnxruntime_configs_parse_and_match_their_graphs(fixture, request, tmp_path):
    repository = write(request.getfixturevalue(fixture), tmp_path / "repo", "onnxruntime")
    assert sorted(p.name for p in repository.iterdir()) == sorted([*COMPONENTS, "pipeline"])
    for name in COMPONENTS:
        config = parsed((repository / name / "config.pbtxt").read_text())
        graph = onnx.load(str(repository / name / "1" / "model.onnx"), load_external_data=False).graph
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        assert tensors(config, "input") == graph_tensors(graph.input), name
        assert tensors(config, "output") == graph_tensors(graph.output), name


def test_tensorrt_configs_state_the_engine_profile(tiny_bundle):
    from sdrun.bundle import read_manifest

    record = read_manifest(tiny_bundle).components["unet_step"]
    static = {name: {key: ranges["opt"] for key in ("min", "opt", "max")} for name, ranges in record.profile.items()}
    for profile in (record.profile, static):
        config = parsed(component_config("unet_step", record, ComponentKind.TENSORRT, 2, profile))
        assert config.platform == "tensorrt_plan" and config.instance_group[0].count == 2
        expected = [[low if low == high else -1 for low, high in zip(profile[n]["min"], profile[n]["max"])]
                    for n, _, _ in tensors(config, "input")]
        assert [dims for _, _, dims in tensors(config, "input")] == expected
    dynamic = parsed(component_config("unet_step", record, ComponentKind.TENSORRT, 1, record.profile))
    assert any(-1 in dims for _, _, dims in tensors(dynamic, "input"))
    context = {name: dims for name, _, dims in tensors(dynamic, "input")}["encoder_hidden_states"]
    assert context[1] == -1, "the context's token axis (77·chunks) is not fixed to 77"


def test_tensorrt_without_engines_is_refused_with_the_build_command(tiny_bundle, tmp_path):
    from sdrun.errors import UserError

    with pytest.raises(UserError, match="sdcompile build-trt"):
        CliRunner().invoke(cli, ["triton-repo", str(tiny_bundle), "--out", str(tmp_path / "repo"), "--components",
                                 "tensorrt"], standalone_mode=False, catch_exceptions=False)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo.partial").exists()


def test_python_repository_serves_the_pipeline_as_sdrun_txt2img_draws(tiny_bundle, tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the serve extra, its tritonserver) is not installed")
    from benchmarks.server_process import running_tritonserver
    from sdrun.generate import result_parameters
    from sdrun.pipeline import GenerationRequest
    from sdrun.serve.client import remote_generate, request_tensors
    from sdrun.session import load_pipeline

    repository = write(tiny_bundle, tmp_path / "repo", "python")
    config = parsed((repository / "pipeline" / "config.pbtxt").read_text())
    assert config.backend == "python" and [t.name for t in config.input][0] == "prompt"
    values = {"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "steps": 4, "seed": 5,
              "sampler": "euler_a"}
    with running_tritonserver(repository, tmp_path, models=(*COMPONENTS, "pipeline")) as server:
        image, parameters = remote_generate(server.url, "pipeline", request_tensors("txt2img", values), 120)
        with pytest.raises(Exception, match="steps must be a positive integer"):
            remote_generate(server.url, "pipeline", request_tensors("txt2img", {**values, "steps": 0}), 120)
    local = load_pipeline(tiny_bundle, "onnxruntime")
    result = local.pipeline.generate(GenerationRequest(**values))
    assert np.abs(image.astype(int) - result.images[0]).max() <= PIXEL
    assert parameters == result_parameters(result, local.pipeline.bundle, "onnxruntime", img2img=False)
