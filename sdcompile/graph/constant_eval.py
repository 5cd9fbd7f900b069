"""Values of tensors computed only from constants and tensor shapes.

Exporters leave small constant subgraphs in place (TorchScript: `Pow(c, c)` for the attention
scale, `Trilu` for a causal mask; decomposed SDPA: `Sqrt(1 / Sqrt(Shape(q)[-1]))`). We evaluate
such a subgraph with the ONNX reference evaluator. Dims unknown at compile time (symbolic batch,
sequence) are replaced by sentinel sizes; a value is static when every sentinel assignment gives
the same array, and a mask can be checked for a property (causality) under each assignment.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from sdcompile.graph.surgery import constant_values, has_subgraph, producer

MAX_SUBGRAPH_NODES = 64
MAX_CONSTANT_ELEMENTS = 1 << 20
# Two sentinel assignments for unknown dims: symbol i gets base + i.
SENTINEL_BASES = (7, 19)
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                  "RandomUniformLike", "Bernoulli", "Multinomial"})


@dataclass(frozen=True)
class _Subgraph:
    nodes: tuple[gs.Node, ...]          # producers-first, Shape nodes excluded
    shape_nodes: tuple[gs.Node, ...]    # leaves whose outputs are fed as inputs
    constants: tuple[gs.Constant, ...]


def _collect(tensor: gs.Tensor) -> _Subgraph | None:
    nodes, shape_nodes, constants, seen = [], [], {}, set()

    def visit(t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant):
            if math.prod(t.shape) > MAX_CONSTANT_ELEMENTS:  # the shape alone: weights are not read
                return False
            constants[t.name] = t
            return True
        node = producer(t)
        if node is None:
            return False
        if id(node) in seen:
            return True
        seen.add(id(node))
        if node.op == "Shape" and (node.domain or "") == "":
            shape_nodes.append(node)
            return node.inputs[0].shape is not None
        if node.op in NONDETERMINISTIC_OPS or has_subgraph(node) or (node.domain or "") != "":
            return False
        if len(seen) > MAX_SUBGRAPH_NODES:
            return False
        if not all(visit(i) for i in node.inputs if not i.is_empty()):
            return False
        nodes.append(node)
        return True

    if not visit(tensor):
        return None
    return _Subgraph(tuple(nodes), tuple(shape_nodes), tuple(constants.values()))


def _shape_value(node: gs.Node, symbols: dict, base: int) -> np.ndarray:
    dims = []
    for dim in node.inputs[0].shape:
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        else:
            key = dim if isinstance(dim, str) else ("unnamed", id(node), len(dims))
            dims.append(base + symbols.setdefault(key, len(symbols)))
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return np.array(dims[start:end], dtype=np.int64)


def _evaluate(tensor: gs.Tensor, sub: _Subgraph, opset: int, base: int) -> np.ndarray | None:
    symbols: dict = {}
    feeds = {n.outputs[0].name: _shape_value(n, symbols, base) for n in sub.shape_nodes}
    if tensor.name in feeds:
        return feeds[tensor.name]
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in sub.nodes], "constant_subgraph",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in feeds],
        [onnx.helper.make_tensor_value_info(tensor.name, onnx.TensorProto.UNDEFINED, None)],
        initializer=[OnnxExporter.export_tensor_proto(c) for c in sub.constants])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # noqa: BLE001 - an op the reference evaluator lacks: not evaluable
        return None


def sentinel_values(tensor: gs.Tensor, opset: int) -> tuple[np.ndarray, ...] | None:
    """The tensor's value under each sentinel assignment of unknown dims (one value when the
    subgraph reads no shapes); None when it depends on anything but constants and shapes."""
    if isinstance(tensor, gs.Constant):
        return (np.asarray(constant_values(tensor)),)
    sub = _collect(tensor)
    if sub is None:
        return None
    bases = SENTINEL_BASES if sub.shape_nodes else SENTINEL_BASES[:1]
    values = tuple(_evaluate(tensor, sub, opset, base) for base in bases)
    return None if any(v is None for v in values) else values


def static_value(tensor: gs.Tensor, opset: int) -> np.ndarray | None:
    """The tensor's value if it is the same for every size of the graph's unknown dims."""
    values = sentinel_values(tensor, opset)
    if values is None:
        return None
    first = values[0]
    same = all(v.shape == first.shape and np.array_equal(v, first, equal_nan=True) for v in values)
    return first if same else None


def scalar_value(tensor: gs.Tensor, opset: int) -> float | None:
    """A static single-element float value (any rank), else None."""
    value = static_value(tensor, opset)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(()))
