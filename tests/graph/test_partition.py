"""A graph run part by part (each part its own session, its own weights) gives the whole graph's outputs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdcompile.graph.external import spill, tensor_nbytes
from sdcompile.graph.partition import plan_parts, run_in_parts

WIDTH, LAYERS = 64, 6
WEIGHT_BYTES = WIDTH * WIDTH * 4


def residual_stack(dtype=np.float32) -> onnx.ModelProto:
    """h_{i+1} = h_i @ W_i + h_{i-1}: every cut is crossed by two values; `mid` (h_3) is also a graph output
    read by later nodes. In `dtype` between a Cast from and a Cast to float32."""
    rng = np.random.default_rng(0)
    code = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / WIDTH**0.5).astype(dtype), f"w{i}")
               for i in range(LAYERS)]
    nodes = [helper.make_node("Cast", ["x"], ["h0"], to=code), helper.make_node("Neg", ["h0"], ["h-1"])]
    for i in range(LAYERS):
        nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"p{i}"]),
                  helper.make_node("Add", [f"p{i}", f"h{i - 1}"], [f"h{i + 1}"])]
    nodes += [helper.make_node("Cast", [f"h{LAYERS}"], ["y"], to=TensorProto.FLOAT),
              helper.make_node("Cast", ["h3"], ["mid"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", WIDTH]) for n in ("y", "mid")],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def cpu_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_parts_hold_at_most_the_budget_and_cover_every_node_once():
    graph = residual_stack().graph
    parts = plan_parts(graph, 2 * WEIGHT_BYTES)
    assert len(parts) == 3
    assert [p.first for p in parts] == [0, *[p.stop for p in parts[:-1]]] and parts[-1].stop == len(graph.node)
    sizes = {t.name: tensor_nbytes(t) for t in graph.initializer}
    for part in parts:
        assert sum(sizes.get(i, 0) for n in graph.node[part.first:part.stop] for i in n.input) <= 2 * WEIGHT_BYTES
    assert parts[1].inputs == ("h2", "h1") and set(parts[1].outputs) == {"h3", "h4"}
    assert plan_parts(graph, LAYERS * WEIGHT_BYTES) == [plan_parts(graph, 10**12)[0]]


def test_parts_hold_at_most_max_nodes_when_given():
    graph = residual_stack().graph
    parts = plan_parts(graph, 10**12, max_nodes=5)
    assert len(graph.node) == 16 and [p.stop - p.first for p in parts] == [5, 5, 5, 1]
    assert parts[-1].stop == len(graph.node)


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 0.0), (np.float16, 2e-3)])
def test_running_in_parts_equals_the_whole_graph(tmp_path, dtype, tolerance):
    spill(residual_stack(dtype), tmp_path / "model.onnx", None)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)}
    whole = dict(zip(("y", "mid"), cpu_session(tmp_path / "model.onnx").run(["y", "mid"], feeds)))
    parted = run_in_parts(tmp_path / "model.onnx", feeds, 2 * WEIGHT_BYTES * np.dtype(dtype).itemsize // 4, cpu_session)
    assert list(parted) == ["y", "mid"]
    for name, value in whole.items():
        assert np.linalg.norm(parted[name] - value) <= tolerance * np.linalg.norm(value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # part files removed
