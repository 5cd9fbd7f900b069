"""Cast a float32 graph to fp16 compute, keeping the fp32 islands of graph/fp16_policy.py.

Every node that computes on float32 tensors computes in fp16 unless it is in an island. Walking
the graph producers-first, each node gets its tied float inputs (those sharing the type of an
output or of another input, per the operator schema) in its compute type, through one shared
Cast per (tensor, type) — or, for a constant, one converted copy per type, so an initializer
read by both fp32 and fp16 nodes is stored once in each. Inputs with a fixed type (Resize
`scales`: float32) are cast back when needed; independently typed inputs (Shape's data,
Attention's mask) are left alone. Integer tensors are never touched. A Cast requested on the
output of a Cast reads that Cast's input instead, so no Cast→Cast chain is created, and Cast
pairs already in the graph are merged or cancelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from sdcompile.graph.dtypes import (FLOAT_TYPES, INTEGER_TYPES, DTYPE_ATTRIBUTE_OPS,
                                    allowed_dtypes, formal_input_type, node_schema, numpy_dtype,
                                    onnx_dtype, output_dtypes, tensor_dtypes, tied_float_inputs,
                                    topological_order)
from sdcompile.graph.external import CreatedTensors
from sdcompile.graph.fp16_policy import Fp16Options, IoDtype, fp32_island_nodes
from sdcompile.graph.pass_result import GraphResult, PassResult, model_from_graph
from sdcompile.graph.shape_inference import check_model_types
from sdcompile.graph.surgery import NameSource, constant_values, copy_graph, has_subgraph, producer, replace_uses
from sdcompile.inspection.fp16_audit import PrecisionAudit, audit_precision

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_SUFFIX = {FP32: "fp32", FP16: "fp16"}
# Independently typed float inputs that still follow the node's compute type: Attention's
# additive mask may be any float in ONNX, but kernels (CUDA, TensorRT) add it to the scores in
# the scores' type.
FOLLOW_COMPUTE_INPUTS = {("", "Attention"): frozenset({3})}


@dataclass(frozen=True)
class Fp16Report:
    io_dtype: IoDtype
    casts: int                 # Cast nodes in the result (borders of islands and I/O)
    precision: PrecisionAudit  # fp16/fp32 compute-node counts of the result


def fp16_values(values: np.ndarray) -> np.ndarray:
    """float32 -> float16, clamping finite values to ±65504 (±inf and NaN kept)."""
    finite = np.isfinite(values)
    return np.where(finite, np.clip(values, -FP16_MAX, FP16_MAX), values).astype(np.float16)


def inline_constant_nodes(graph: gs.Graph) -> None:
    """Turn `Constant` nodes whose value is a tensor into graph constants (in place); those
    feeding a graph output directly stay."""
    for node in list(graph.nodes):
        value = node.attrs.get("value") if node.op == "Constant" else None
        out = node.outputs[0] if node.outputs else None
        if not isinstance(value, gs.Constant) or any(out is o for o in graph.outputs):
            continue
        node.outputs.clear()
        replace_uses(out, gs.Constant(out.name, value.values))
    graph.cleanup(remove_unused_graph_inputs=False)


class _Casts:
    """Tensors converted to a float type, made once per (tensor, type)."""

    def __init__(self, graph: gs.Graph, dtypes: dict[str, int], created: CreatedTensors):
        self.graph, self.dtypes, self.names, self.created = graph, dtypes, NameSource(graph), created
        self._made: dict[tuple[str, int], gs.Tensor] = {}

    def as_type(self, tensor: gs.Tensor, dtype: int) -> gs.Tensor:
        if self.dtypes.get(tensor.name) == dtype:
            return tensor
        key = (tensor.name, dtype)
        if key not in self._made:
            self._made[key] = self._convert(tensor, dtype)
        return self._made[key]

    def _convert(self, tensor: gs.Tensor, dtype: int) -> gs.Tensor:
        if isinstance(tensor, gs.Constant):
            values = constant_values(tensor)
            converted = fp16_values(values) if dtype == FP16 else values.astype(numpy_dtype(dtype))
            constant = self.created.constant(self.names(f"{tensor.name}_{_SUFFIX[dtype]}"), converted)
            self.dtypes[constant.name] = dtype
            return constant
        source = producer(tensor)
        if source is not None and source.op == "Cast" and (source.domain or "") == "":
            origin = source.inputs[0]
            origin_dtype = self.dtypes.get(origin.name)
            if origin_dtype == dtype:
                return origin
            if origin_dtype in FLOAT_TYPES | INTEGER_TYPES:
                return self.as_type(origin, dtype)
        return self._cast(tensor, dtype)

    def _cast(self, tensor: gs.Tensor, dtype: int) -> gs.Tensor:
        out = gs.Variable(self.names(f"{tensor.name}_{_SUFFIX[dtype]}"), dtype=numpy_dtype(dtype),
                          shape=tensor.shape)
        self.graph.layer(op="Cast", name=self.names(f"{tensor.name}_cast_{_SUFFIX[dtype]}"),
                         inputs=[tensor], outputs=[out], attrs={"to": dtype})
        self.dtypes[out.name] = dtype
        return out


def _set_dtype(tensor: gs.Tensor, dtype: int | None, dtypes: dict[str, int]) -> None:
    if dtype is None or tensor.is_empty():
        return
    dtypes[tensor.name] = dtype
    if isinstance(tensor, gs.Variable):
        tensor.dtype = numpy_dtype(dtype)


def _retype_attributes(node: gs.Node, compute: int) -> None:
    """float32 chosen by an attribute (Cast `to`, ConstantOfShape `value`, `dtype`) becomes
    fp16 in an fp16 node; other types stay."""
    if compute != FP16:
        return
    if node.op == "Cast" and node.attrs.get("to") == FP32:
        node.attrs["to"] = FP16
    elif node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
        value = node.attrs["value"]
        if onnx_dtype(value.dtype) == FP32:
            node.attrs["value"] = gs.Constant(value.name, fp16_values(value.values))
    elif node.op in DTYPE_ATTRIBUTE_OPS and node.attrs.get("dtype") == FP32:
        node.attrs["dtype"] = FP16


def _accepted(schema, index: int) -> frozenset[int]:
    """Types an independently typed input accepts (both floats when the schema cannot tell)."""
    formal = None if schema is None else formal_input_type(schema, index)
    return frozenset({FP32, FP16}) if formal is None else allowed_dtypes(schema, formal)


def _touches_fp32(node: gs.Node, tied: frozenset[int], original: dict[str, int]) -> bool:
    tied_fp32 = any(original.get(node.inputs[i].name) == FP32 for i in tied
                    if i < len(node.inputs) and not node.inputs[i].is_empty())
    return tied_fp32 or any(original.get(o.name) == FP32 for o in node.outputs)


def _convert_node(node: gs.Node, compute: int, graph: gs.Graph, casts: _Casts,
                  original: dict[str, int]) -> None:
    schema = node_schema(node, graph.opset)
    tied = tied_float_inputs(node, schema) | FOLLOW_COMPUTE_INPUTS.get((node.domain or "", node.op),
                                                                      frozenset())
    dtypes = casts.dtypes
    if not _touches_fp32(node, tied, original):
        _propagate(node, schema, dtypes, compute=None, original=original)
        return
    for index, tensor in enumerate(node.inputs):
        current = dtypes.get(tensor.name)
        if tensor.is_empty() or current not in (FP32, FP16):
            continue
        if index in tied:
            node.inputs[index] = casts.as_type(tensor, compute)
        elif current not in _accepted(schema, index):
            node.inputs[index] = casts.as_type(tensor, original.get(tensor.name, FP32))
    _retype_attributes(node, compute)
    _propagate(node, schema, dtypes, compute, original)


def _propagate(node, schema, dtypes, compute, original) -> None:
    inferred = output_dtypes(node, [dtypes.get(t.name) for t in node.inputs], schema)
    for out, dtype in zip(node.outputs, inferred):
        if dtype is None:
            dtype = original.get(out.name)
            if dtype == FP32 and compute is not None:
                dtype = compute
        _set_dtype(out, dtype, dtypes)


def _retype_graph_inputs(graph: gs.Graph, io_dtype: IoDtype, dtypes: dict[str, int]) -> None:
    if io_dtype is IoDtype.FP16:
        for tensor in graph.inputs:
            if dtypes.get(tensor.name) == FP32:
                _set_dtype(tensor, FP16, dtypes)


def _retype_graph_outputs(graph: gs.Graph, io_dtype: IoDtype, casts: _Casts,
                          original: dict[str, int]) -> None:
    """Give each float output its I/O type, renaming the producer's tensor behind a Cast."""
    wanted = FP16 if io_dtype is IoDtype.FP16 else FP32
    for out in list(graph.outputs):
        if original.get(out.name) != FP32 or casts.dtypes.get(out.name) == wanted or not out.inputs:
            continue
        computed = gs.Variable(casts.names(f"{out.name}_{_SUFFIX[casts.dtypes[out.name]]}"),
                               dtype=out.dtype, shape=out.shape)
        casts.dtypes[computed.name] = casts.dtypes[out.name]
        node = out.inputs[0]
        node.outputs[node.outputs.index(out)] = computed
        replace_uses(out, computed)
        casts.graph.layer(op="Cast", name=casts.names(f"{out.name}_cast_{_SUFFIX[wanted]}"),
                          inputs=[computed], outputs=[out], attrs={"to": wanted})
        _set_dtype(out, wanted, casts.dtypes)


def merge_casts(graph: gs.Graph, dtypes: dict[str, int]) -> int:
    """Merge Cast(Cast(x)) into one Cast (float/int -> float -> float) and drop Casts to the
    type they already have; returns how many Casts were removed from use."""
    removed = 0
    for node in topological_order(graph):
        if node.op != "Cast" or (node.domain or "") != "":
            continue
        inner = producer(node.inputs[0])
        if inner is not None and inner.op == "Cast" and (inner.domain or "") == "":
            origin = inner.inputs[0]
            if (dtypes.get(inner.outputs[0].name) in FLOAT_TYPES and node.attrs["to"] in FLOAT_TYPES
                    and dtypes.get(origin.name) in FLOAT_TYPES | INTEGER_TYPES):
                node.inputs[0] = origin
        source = node.inputs[0]
        out = node.outputs[0]
        if dtypes.get(source.name) == node.attrs["to"] and not any(out is o for o in graph.outputs):
            replace_uses(out, source)
            node.outputs.clear()
            removed += 1
    return removed


def _cast_graph(graph: gs.Graph, options: Fp16Options, created: CreatedTensors = CreatedTensors(None)) -> GraphResult:
    g = copy_graph(graph)
    inline_constant_nodes(g)
    original = tensor_dtypes(g)
    island = fp32_island_nodes(g, options, original)
    dtypes = dict(original)
    _retype_graph_inputs(g, options.io_dtype, dtypes)
    casts = _Casts(g, dtypes, created)
    for node in topological_order(g):
        compute = FP32 if id(node) in island or has_subgraph(node) else FP16
        _convert_node(node, compute, g, casts, original)
    _retype_graph_outputs(g, options.io_dtype, casts, original)
    merge_casts(g, dtypes)
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    report = Fp16Report(io_dtype=options.io_dtype, casts=sum(1 for n in g.nodes if n.op == "Cast"),
                        precision=audit_precision(g, options))
    return GraphResult(g, report)


def cast_to_fp16(graph: gs.Graph, options: Fp16Options | None = None) -> GraphResult:
    """fp16 compute outside the fp32 islands; `graph` itself is not modified. The result is
    checked with `onnx.checker.check_model(full_check=True)`."""
    result = _cast_graph(graph, options or Fp16Options())
    check_model_types(gs.export_onnx(result.graph))
    return result


def run(model: onnx.ModelProto, options: PassOptions) -> PassResult:
    result = _cast_graph(gs.import_onnx(model), options.fp16 or Fp16Options(), CreatedTensors(options.scratch))
    cast, report = model_from_graph(result.graph, model), result.report
    del result  # the converted weights now live in `cast` alone
    check_model_types(cast)
    return PassResult(cast, report)
