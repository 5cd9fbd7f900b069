"""Step fusion on a hand-built stand-in UNet graph, checked numerically on ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pass_graphs import toy_unet

from sdcompile.passes import PassOptions
from sdcompile.passes.step_fusion import StepFusionReport, run, step_fused_unet, wrapper_node_names
from sdrun.samplers.plan import STATE_WIDTH
from sdrun.errors import UserError


def _toy_reference(sample, t, ctx):
    return 0.5 * sample + t / 1000 + ctx.mean(axis=(1, 2), keepdims=True)[..., None]


def test_fused_step_equals_cfg_plus_linear_update():
    rng = np.random.default_rng(0)
    state = rng.standard_normal((STATE_WIDTH, 2, 4, 3, 5), dtype=np.float32)
    noise = rng.standard_normal(state.shape[1:], dtype=np.float32)
    ctx = rng.standard_normal((4, 77, 8), dtype=np.float32)
    update = rng.standard_normal((STATE_WIDTH, STATE_WIDTH + 2), dtype=np.float32)
    t, scale, g = np.array([501.0], np.float32), np.array([0.3], np.float32), 7.5
    fused = step_fused_unet(toy_unet())
    onnx.checker.check_model(fused, full_check=True)
    got = ort.InferenceSession(fused.SerializeToString()).run(None, {
        "state": state, "timestep": t, "input_scale": scale, "encoder_hidden_states": ctx,
        "guidance": np.array([g], np.float32), "update": update, "noise": noise})[0]
    x_in = scale[0] * state[0]
    uncond, cond = np.split(_toy_reference(np.concatenate([x_in, x_in]), t, ctx), 2)
    operands = [*state, uncond + g * (cond - uncond), noise]
    expected = np.stack([sum(update[i, j] * operands[j] for j in range(STATE_WIDTH + 2))
                         for i in range(STATE_WIDTH)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_graph_io_and_input_untouched():
    model = toy_unet()
    before = model.SerializeToString()
    fused = step_fused_unet(model)
    assert model.SerializeToString() == before
    assert tuple(i.name for i in fused.graph.input) == ("state", "timestep", "input_scale", "encoder_hidden_states",
                                                         "guidance", "update", "noise")
    dims = [d.dim_param or d.dim_value for d in fused.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [STATE_WIDTH, "batch", 4, "h", "w"]
    assert [o.name for o in fused.graph.output] == ["next_state"]


def test_refuses_unconventional_io():
    model = toy_unet()
    model.graph.output[0].name = "out_sample"
    model.graph.node[-1].output[0] = "out_sample"
    with pytest.raises(UserError, match="conventional I/O"):
        step_fused_unet(model)


def test_refuses_old_opset():
    with pytest.raises(UserError, match="opset >= 18"):
        step_fused_unet(toy_unet(opset=17))


def test_run_reports_the_wrapper_nodes_it_keeps_in_fp32():
    result = run(toy_unet(), PassOptions())
    assert result.report == StepFusionReport(tuple(wrapper_node_names(result.model)))
    assert "unet_step/update" in result.report.fp32_node_names
    assert not any(name.startswith("unet_step/") for name in wrapper_node_names(toy_unet()))
