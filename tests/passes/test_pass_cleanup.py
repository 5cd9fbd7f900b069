"""Cleanup pass and the shape-inference helpers behind it."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from pass_graphs import model_of, run_onnx

from sdcompile.graph.shape_inference import check_model_types, infer_shapes, with_inferred_shapes
from sdcompile.passes.cleanup import cleanup

FP32 = TensorProto.FLOAT


def exporter_style_model() -> onnx.ModelProto:
    """x (2, 4, 4) -> softmax(x·x^T · 4^-0.5 + triu(-inf)) with TorchScript-style constants:
    the scale as Pow(Constant, Constant), the mask as Trilu(Constant), a dead branch, and the
    nodes listed out of order."""
    const = lambda name, value: helper.make_node(  # noqa: E731 - table of tiny constants
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))
    nodes = [
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["x", "xt"], ["scores"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        const("base", np.float32(4.0)), const("exponent", np.float32(-0.5)),
        helper.make_node("Pow", ["base", "exponent"], ["scale"]),
        const("neg_inf", np.full((4, 4), -np.inf, np.float32)), const("one", np.int64(1)),
        helper.make_node("Trilu", ["neg_inf", "one"], ["mask"], upper=1),
        helper.make_node("Relu", ["x"], ["unused"]),
    ]
    graph = helper.make_graph(nodes, "exporter_style",
                              [helper.make_tensor_value_info("x", FP32, [2, 4, 4])],
                              [helper.make_tensor_value_info("y", FP32, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 4, 4)).astype(np.float32)}


def test_cleanup_folds_constants_drops_dead_nodes_and_sorts():
    model = exporter_style_model()
    graph = gs.import_onnx(model)
    cleaned = cleanup(graph)
    ops = [n.op for n in cleaned.nodes]
    assert ops == ["Transpose", "MatMul", "Mul", "Add", "Softmax"]
    assert len(graph.nodes) == len(model.graph.node)  # the input graph is left as it was
    mask = cleaned.nodes[3].inputs[1]
    assert isinstance(mask, gs.Constant) and np.isneginf(mask.values[0, 1])
    np.testing.assert_allclose(cleaned.nodes[2].inputs[1].values, 0.5)
    np.testing.assert_array_equal(run_onnx(model_of(cleaned), FEEDS)[0], run_onnx(model, FEEDS)[0])


def test_cleanup_infers_every_tensor_type_and_shape():
    cleaned = cleanup(gs.import_onnx(exporter_style_model()))
    for tensor in cleaned.tensors().values():
        assert tensor.dtype is not None and tensor.shape is not None, tensor.name
    assert cleaned.outputs[0].shape == [2, 4, 4]


def test_unknown_static_dims_are_recovered_under_symbolic_inputs():
    """Reshape((B, S, 8), (B, S, 2, -1)): plain inference cannot divide symbols; the last
    dim is 4 whatever B and S are."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], end=2),
             helper.make_node("Concat", ["shape", "heads"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    graph = helper.make_graph(
        nodes, "split_heads", [helper.make_tensor_value_info("x", FP32, ["B", "S", 8])],
        [helper.make_tensor_value_info("y", FP32, None)],
        initializer=[numpy_helper.from_array(np.array([2, -1], np.int64), "heads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inferred = with_inferred_shapes(gs.import_onnx(model))
    assert inferred.outputs[0].shape[2:] == [2, 4]
    assert inferred.outputs[0].shape[:2] == ["B", "S"]


def test_inference_keeps_weights_and_reads_only_their_shapes():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)  # above the small-initializer size
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "matmul", [helper.make_tensor_value_info("x", FP32, ["B", 64])],
        [helper.make_tensor_value_info("y", FP32, None)],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inferred = infer_shapes(model)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", 32]
    assert [i.name for i in inferred.graph.input] == ["x"]
    np.testing.assert_array_equal(numpy_helper.to_array(inferred.graph.initializer[0]), weight)
    assert not model.graph.value_info  # the argument is left as it was


def test_group_normalization_outputs_get_their_input_shape():
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2),
             helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "gn",
                              [helper.make_tensor_value_info("x", FP32, ["B", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", FP32, None)],
                              initializer=[helper.make_tensor("s", FP32, [4], [1.0] * 4),
                                           helper.make_tensor("b", FP32, [4], [0.0] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    inferred = infer_shapes(model)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", 4, 3, 3]
    assert [n.op_type for n in inferred.graph.node] == ["GroupNormalization", "Relu"]


def test_the_type_check_reads_no_weight():
    """Large initializers stand in as typed inputs: one whose external data does not exist is not read."""
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "large",
                              [helper.make_tensor_value_info("x", FP32, ["n", 64])],
                              [helper.make_tensor_value_info("y", FP32, None)], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    check_model_types(model)
    large = model.graph.initializer[0]
    large.ClearField("raw_data")
    large.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "absent.data"), ("offset", "0"), ("length", "16384")):
        entry = large.external_data.add()
        entry.key, entry.value = key, value
    check_model_types(model)
