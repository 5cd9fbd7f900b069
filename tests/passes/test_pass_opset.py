"""Raising the default-domain opset when Attention needs 23."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_graphs import model_of, run_onnx

from sdcompile.graph.opset import upgrade_opset_in_place
from sdcompile.graph.shape_inference import check_model_types
from sdcompile.graph.surgery import copy_graph
from sdrun.errors import UserError

FP32 = TensorProto.FLOAT
X = np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32)


def _model(nodes, opset, initializers=(), output_shape=(1, 4, 3, 3)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FP32, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", FP32, list(output_shape))],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _upgraded(model: onnx.ModelProto, version: int = 23) -> onnx.ModelProto:
    graph = copy_graph(gs.import_onnx(model))
    upgrade_opset_in_place(graph, version)
    upgraded = model_of(graph)
    check_model_types(upgraded)
    return upgraded


def test_reduce_axes_attribute_becomes_an_input():
    model = _model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], 17,
                   output_shape=(1, 4, 1, 1))
    model.ir_version = 8
    upgraded = _upgraded(model)
    assert upgraded.opset_import[0].version == 23 and len(upgraded.graph.node[0].input) == 2
    assert upgraded.ir_version >= 11  # opset 23 needs IR 11
    np.testing.assert_allclose(run_onnx(upgraded, {"x": X})[0], run_onnx(model, {"x": X})[0])


def test_group_norm_18_per_group_scale_becomes_per_channel():
    scale, bias = np.array([0.5, 2.0], np.float32), np.array([0.1, -0.3], np.float32)
    model = _model([helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"],
                                     num_groups=2, epsilon=1e-5)], 18,
                   [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    upgraded = _upgraded(model, 21)
    per_channel = numpy_helper.to_array(upgraded.graph.initializer[0])
    np.testing.assert_array_equal(per_channel, [0.5, 0.5, 2.0, 2.0])
    groups = X.reshape(1, 2, -1)
    normed = ((groups - groups.mean(-1, keepdims=True))
              / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)).reshape(X.shape)
    expected = normed * np.repeat(scale, 2)[None, :, None, None] + np.repeat(bias, 2)[None, :, None, None]
    np.testing.assert_allclose(run_onnx(upgraded, {"x": X})[0], expected, atol=1e-5)


def test_grid_sample_modes_are_renamed():
    grid = numpy_helper.from_array(np.zeros((1, 3, 3, 2), np.float32), "grid")
    model = _model([helper.make_node("GridSample", ["x", "grid"], ["y"], mode="bilinear")], 17, [grid])
    upgraded = _upgraded(model)
    assert helper.get_attribute_value(upgraded.graph.node[0].attribute[0]) == b"linear"


def test_too_old_opset_is_refused_with_a_fix():
    graph = gs.import_onnx(_model([helper.make_node("Relu", ["x"], ["y"])], 11))
    with pytest.raises(UserError) as error:
        upgrade_opset_in_place(graph, 23)
    assert "13" in error.value.expected and "re-export" in error.value.fix


def test_graph_already_at_the_target_is_left_alone():
    graph = gs.import_onnx(_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1])], 17))
    upgrade_opset_in_place(graph, 17)
    assert graph.opset == 17 and graph.nodes[0].attrs["axes"] == [1]
