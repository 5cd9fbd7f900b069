"""Step fusion on a hand-built stand-in UNet graph, checked numerically on ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sdcompile.passes.step_fusion import step_fused_unet
from sdrun.errors import UserError


def _toy_unet(opset: int = 23) -> onnx.ModelProto:
    """latent = 0.5·sample + t/1000 + mean over (tokens, channels) of the context, per batch item."""
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Div", ["timestep", "thousand"], ["t_scaled"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states", "axes"], ["ctx_mean"], keepdims=1),
        helper.make_node("Unsqueeze", ["ctx_mean", "last"], ["ctx4"]),
        helper.make_node("Add", ["scaled", "t_scaled"], ["with_t"]),
        helper.make_node("Add", ["with_t", "ctx4"], ["latent"]),
    ]
    inits = [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("thousand", TensorProto.FLOAT, [], [1000.0]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("last", TensorProto.INT64, [1], [3])]
    graph = helper.make_graph(
        nodes, "toy_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["cfg_batch", 4, "h", "w"]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["cfg_batch", 77, 8])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["cfg_batch", 4, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _toy_reference(sample, t, ctx):
    return 0.5 * sample + t / 1000 + ctx.mean(axis=(1, 2), keepdims=True)[..., None]


def test_fused_step_equals_cfg_plus_linear_update():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 5), dtype=np.float32)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    ctx = rng.standard_normal((4, 77, 8), dtype=np.float32)
    t, g = np.array([501.0], np.float32), 7.5
    coefficients = np.array([1.02, -0.2, 0.05], np.float32)
    fused = step_fused_unet(_toy_unet())
    onnx.checker.check_model(fused, full_check=True)
    got = ort.InferenceSession(fused.SerializeToString()).run(None, {
        "sample": x, "timestep": t, "encoder_hidden_states": ctx, "guidance": np.array([g], np.float32),
        "step_coefficients": coefficients, "noise": noise})[0]
    out = _toy_reference(np.concatenate([x, x]), t, ctx)
    uncond, cond = np.split(out, 2)
    expected = coefficients[0] * x + coefficients[1] * (uncond + g * (cond - uncond)) + coefficients[2] * noise
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_fused_graph_io_and_input_untouched():
    model = _toy_unet()
    before = model.SerializeToString()
    fused = step_fused_unet(model)
    assert model.SerializeToString() == before
    assert [i.name for i in fused.graph.input] == ["sample", "timestep", "encoder_hidden_states", "guidance",
                                                   "step_coefficients", "noise"]
    dims = [d.dim_param or d.dim_value for d in fused.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "h", "w"]


def test_refuses_unconventional_io():
    model = _toy_unet()
    model.graph.output[0].name = "out_sample"
    model.graph.node[-1].output[0] = "out_sample"
    with pytest.raises(UserError, match="conventional I/O"):
        step_fused_unet(model)


def test_refuses_old_opset():
    with pytest.raises(UserError, match="opset >= 18"):
        step_fused_unet(_toy_unet(opset=17))
