"""fp16 casting with fp32 islands on a hand-built graph that has every awkward case."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_graphs import attention_feeds, attention_model, model_of, relative_l2, run_onnx

from sdcompile.graph.dtypes import tensor_dtypes
from sdcompile.inspection.fp16_audit import audit_precision
from sdcompile.passes import Fp16Options, IoDtype
from sdcompile.passes.fp16 import cast_to_fp16, fp16_values, merge_casts
from sdcompile.passes.fused_attention import fuse_attention

# fp16 rounds each stored activation and weight to 11 significant bits (2⁻¹¹ ≈ 5e-4); through
# the ~10 ops of these graphs the output error stays well inside 5e-3 relative L2.
FP16_RTOL_L2 = 5e-3
FP32, FP16, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
CHANNELS, SIZE = 4, 4


def _init(name, values):
    return numpy_helper.from_array(np.asarray(values), name)


def mixed_model() -> onnx.ModelProto:
    """x (1, C, 4, 4) float, t (1,) int64 -> y (1, 64, C): group norm, SiLU, conv, timestep
    embedding (Sin/Cos), upsampling Resize, int64 shape arithmetic, LayerNorm, a hand-decomposed
    norm, float Range, a Constant node, and an initializer shared by fp32 and fp16 nodes."""
    rng = np.random.default_rng(0)
    c = CHANNELS
    inits = [
        _init("freqs", np.exp(-np.log(1e4) * np.arange(c // 2) / (c // 2)).astype(np.float32)[None]),
        _init("axis1", np.array([1], np.int64)),
        _init("w_time", rng.standard_normal((c, c)).astype(np.float32) * 0.5),
        _init("gn_scale", (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
        _init("shared_bias", (0.1 * rng.standard_normal(c)).astype(np.float32)),
        _init("conv_w", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.2),
        _init("time_axes", np.array([2, 3], np.int64)),
        _init("scales", np.array([1, 1, 2, 2], np.float32)),
        _init("gather_idx", np.array([0, 1], np.int64)),
        _init("minus_one", np.array([-1], np.int64)),
        _init("perm_dummy", np.array([0], np.int64)),
        _init("w_out", rng.standard_normal((c, c)).astype(np.float32) * 0.5),
        _init("two", np.array(2.0, np.float32)),
        _init("eps", np.array(1e-5, np.float32)),
        _init("start", np.array(0.0, np.float32)),
        _init("limit", np.array(64.0, np.float32)),
        _init("delta", np.array(1.0, np.float32)),
        _init("pos_scale", np.array(1e-3, np.float32)),
        _init("axes_last", np.array([-1], np.int64)),
    ]
    ln_scale = numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c)).astype(np.float32))
    n = helper.make_node
    nodes = [
        # timestep embedding: t·freqs -> [cos, sin] -> linear (1, C)
        n("Unsqueeze", ["t", "axis1"], ["t_col"]),
        n("Cast", ["t_col"], ["t_float"], to=FP32),
        n("Mul", ["t_float", "freqs"], ["phase"]),
        n("Cos", ["phase"], ["cos"]), n("Sin", ["phase"], ["sin"]),
        n("Concat", ["cos", "sin"], ["temb_raw"], axis=-1),
        n("MatMul", ["temb_raw", "w_time"], ["temb"]),
        # GroupNorm -> SiLU -> conv + temb -> 2x nearest upsample
        n("GroupNormalization", ["x", "gn_scale", "shared_bias"], ["gn"], num_groups=2, epsilon=1e-5),
        n("Sigmoid", ["gn"], ["gate"]), n("Mul", ["gn", "gate"], ["silu"]),
        n("Conv", ["silu", "conv_w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        n("Unsqueeze", ["temb", "time_axes"], ["temb_4d"]),
        n("Add", ["conv", "temb_4d"], ["h"]),
        n("Resize", ["h", "", "scales"], ["up"], mode="nearest"),
        # (1, C, 8, 8) -> (1, C, 64) via int64 shape arithmetic -> (1, 64, C)
        n("Shape", ["up"], ["up_shape"]),
        n("Gather", ["up_shape", "gather_idx"], ["batch_channels"]),
        n("Concat", ["batch_channels", "minus_one"], ["seq_shape"], axis=0),
        n("Reshape", ["up", "seq_shape"], ["seq_cs"]),
        n("Transpose", ["seq_cs"], ["seq"], perm=[0, 2, 1]),
        n("Constant", [], ["ln_scale"], value=ln_scale),
        n("LayerNormalization", ["seq", "ln_scale", "shared_bias"], ["ln"], axis=-1),
        n("MatMul", ["ln", "w_out"], ["proj"], name="proj"),
        # hand-decomposed norm over the last axis
        n("ReduceMean", ["proj", "axes_last"], ["mean"]),
        n("Sub", ["proj", "mean"], ["centred"]),
        n("Pow", ["centred", "two"], ["squared"]),
        n("ReduceMean", ["squared", "axes_last"], ["variance"]),
        n("Add", ["variance", "eps"], ["variance_eps"]),
        n("Sqrt", ["variance_eps"], ["std"]),
        n("Div", ["centred", "std"], ["normed"]),
        # float positions from Range added as a small bias (64,) -> (64, 1)
        n("Range", ["start", "limit", "delta"], ["positions"]),
        n("Unsqueeze", ["positions", "axes_last"], ["positions_col"]),
        n("Mul", ["positions_col", "pos_scale"], ["pos_bias"]),
        n("Add", ["normed", "pos_bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", FP32, [1, c, SIZE, SIZE]),
         helper.make_tensor_value_info("t", INT64, [1])],
        [helper.make_tensor_value_info("y", FP32, [1, 4 * SIZE * SIZE, c])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


FEEDS = {"x": np.random.default_rng(1).standard_normal((1, CHANNELS, SIZE, SIZE)).astype(np.float32),
         "t": np.array([981], np.int64)}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return mixed_model()


@pytest.fixture(scope="module")
def converted(model):
    return cast_to_fp16(gs.import_onnx(model))


def _nodes(graph: gs.Graph, op: str) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == op]


def _dtype(tensor: gs.Tensor) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))


def test_fp16_result_matches_fp32_on_onnxruntime(model, converted):
    expected = run_onnx(model, FEEDS)[0]
    actual = run_onnx(model_of(converted.graph), FEEDS)[0]
    assert actual.dtype == np.float32
    assert relative_l2(actual, expected) < FP16_RTOL_L2


def test_islands_compute_in_fp32_and_everything_else_in_fp16(converted):
    dtypes = tensor_dtypes(converted.graph)
    by_op = {}
    for node in converted.graph.nodes:
        dtype = dtypes.get(node.outputs[0].name)
        if node.op != "Cast" and dtype != INT64:
            by_op.setdefault(node.op, set()).add(dtype)
    for op in ("GroupNormalization", "Sin", "Cos", "Pow", "Sqrt", "ReduceMean", "Range"):
        assert by_op[op] == {FP32}, op
    for op in ("Conv", "MatMul", "LayerNormalization", "Sigmoid", "Concat", "Transpose"):
        assert by_op[op] == {FP16}, op
    assert converted.report.precision.only_islands_in_fp32
    assert converted.report.precision.fp16_nodes > converted.report.precision.fp32_nodes


def test_timestep_phase_and_sandwiched_eps_stay_fp32(converted):
    dtypes = tensor_dtypes(converted.graph)
    assert dtypes["phase"] == FP32 and dtypes["t_float"] == FP32   # t·freqs before Sin/Cos
    assert dtypes["variance_eps"] == FP32                          # between ReduceMean and Sqrt
    assert dtypes["centred"] == FP16


def test_typed_inputs_keep_their_required_types(converted):
    graph = converted.graph
    (resize,) = _nodes(graph, "Resize")
    assert _dtype(resize.inputs[0]) == FP16 and _dtype(resize.inputs[2]) == FP32  # scales: float
    (layer_norm,) = _nodes(graph, "LayerNormalization")
    assert {_dtype(t) for t in layer_norm.inputs} == {FP16}  # Scale and B follow X
    (group_norm,) = _nodes(graph, "GroupNormalization")
    assert {_dtype(t) for t in group_norm.inputs} == {FP32}


def test_integer_tensors_are_untouched(converted):
    dtypes = tensor_dtypes(converted.graph)
    for name in ("t", "t_col", "up_shape", "batch_channels", "seq_shape"):
        assert dtypes[name] == INT64, name


def test_shared_initializer_is_stored_once_per_type(converted):
    graph = converted.graph
    (group_norm,), (layer_norm,) = _nodes(graph, "GroupNormalization"), _nodes(graph, "LayerNormalization")
    fp32_bias, fp16_bias = group_norm.inputs[2], layer_norm.inputs[2]
    assert isinstance(fp32_bias, gs.Constant) and isinstance(fp16_bias, gs.Constant)
    assert fp32_bias.values.dtype == np.float32 and fp16_bias.values.dtype == np.float16
    np.testing.assert_allclose(fp16_bias.values, fp32_bias.values, rtol=1e-3)


def test_constant_node_becomes_an_fp16_initializer(converted):
    (layer_norm,) = _nodes(converted.graph, "LayerNormalization")
    assert isinstance(layer_norm.inputs[1], gs.Constant)
    assert not _nodes(converted.graph, "Constant")


def test_casts_sit_only_at_borders_without_chains(converted):
    dtypes = tensor_dtypes(converted.graph)
    casts = _nodes(converted.graph, "Cast")
    for cast in casts:
        producer = cast.inputs[0].inputs[0] if cast.inputs[0].inputs else None
        assert producer is None or producer.op != "Cast", cast.name
        assert dtypes[cast.inputs[0].name] != cast.attrs["to"], cast.name
    assert converted.report.casts == len(casts)


def test_fp16_io_makes_float_inputs_and_outputs_fp16(model):
    result = cast_to_fp16(gs.import_onnx(model), Fp16Options(io_dtype=IoDtype.FP16))
    graph = result.graph
    assert [_dtype(t) for t in graph.inputs] == [FP16, INT64]
    assert [_dtype(t) for t in graph.outputs] == [FP16]
    feeds = {"x": FEEDS["x"].astype(np.float16), "t": FEEDS["t"]}
    actual = run_onnx(model_of(graph), feeds)[0]
    assert actual.dtype == np.float16
    assert relative_l2(actual, run_onnx(model, FEEDS)[0]) < FP16_RTOL_L2


def test_islands_are_configurable_by_op_type_and_node_name(model):
    options = Fp16Options(keep_fp32_op_types=frozenset({"MatMul"}),
                          keep_fp32_node_names=frozenset({"conv"}), keep_fp32_upstream_of=frozenset())
    result = cast_to_fp16(gs.import_onnx(model), options)
    dtypes = tensor_dtypes(result.graph)
    assert dtypes["proj"] == FP32 and dtypes["temb"] == FP32 and dtypes["conv"] == FP32
    assert dtypes["gn"] == FP16 and dtypes["cos"] == FP16 and dtypes["phase"] == FP16
    assert result.report.precision.only_islands_in_fp32


def test_input_graph_is_not_modified(model):
    graph = gs.import_onnx(model)
    before = [(n.op, [t.name for t in n.inputs], dict(n.attrs)) for n in graph.nodes]
    cast_to_fp16(graph)
    assert [(n.op, [t.name for t in n.inputs], dict(n.attrs)) for n in graph.nodes] == before
    assert all(t.values.dtype != np.float16 for t in graph.tensors().values()
               if isinstance(t, gs.Constant))


def test_audit_lists_fp32_compute_outside_the_islands(model):
    audit = audit_precision(gs.import_onnx(model))
    assert "conv" in audit.fp32_outside_islands and "proj" in audit.fp32_outside_islands
    assert audit.fp16_nodes == 0 and not audit.only_islands_in_fp32
    assert "Sin(sin)" in audit.fp32_island_nodes  # unnamed nodes are labelled op(output)


@pytest.mark.parametrize("variant", [{"causal": True}, {"mask": "constant"}, {"mask": "input"}])
def test_fused_attention_runs_in_fp16(variant):
    model = attention_model(**variant)
    fused = fuse_attention(gs.import_onnx(model)).graph
    result = cast_to_fp16(fused)
    (node,) = _nodes(result.graph, "Attention")
    assert [_dtype(t) for t in node.inputs] == [FP16] * len(node.inputs)  # mask included
    feeds = attention_feeds(model)
    actual = run_onnx(model_of(result.graph), feeds)[0]
    assert relative_l2(actual, run_onnx(model, feeds)[0]) < FP16_RTOL_L2


def test_cast_chains_merge_and_no_op_casts_vanish():
    x = gs.Variable("x", dtype=np.int64, shape=[3])
    as_float, as_half, back = (gs.Variable(n) for n in ("as_float", "as_half", "back"))
    y = gs.Variable("y", dtype=np.float16, shape=[3])
    nodes = [gs.Node("Cast", inputs=[x], outputs=[as_float], attrs={"to": FP32}),
             gs.Node("Cast", inputs=[as_float], outputs=[as_half], attrs={"to": FP16}),
             gs.Node("Cast", inputs=[as_half], outputs=[back], attrs={"to": FP16}),
             gs.Node("Relu", inputs=[back], outputs=[y])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=21)
    merge_casts(graph, tensor_dtypes(graph))
    graph.cleanup()
    (cast,) = _nodes(graph, "Cast")
    assert cast.inputs[0] is x and cast.attrs["to"] == FP16
    assert _nodes(graph, "Relu")[0].inputs[0] is cast.outputs[0]


def test_fp16_values_clamp_to_the_finite_range_and_keep_infinities():
    values = np.array([1e5, -1e5, -np.inf, 0.5], np.float32)
    np.testing.assert_array_equal(fp16_values(values),
                                  np.array([65504, -65504, -np.inf, 0.5], np.float16))
