"""ONNX element types of graph tensors: schema look-ups and forward propagation.

Types are ONNX `TensorProto.DataType` ints throughout (onnx-graphsurgeon stores numpy dtypes on
tensors; `onnx_dtype` converts). Propagation follows each operator's schema: an output whose
formal type parameter also types an input takes that input's type.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                         TensorProto.DOUBLE})
INTEGER_TYPES = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                           TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                           TensorProto.UINT64, TensorProto.BOOL})
# Operators whose float output type is chosen by a `dtype` attribute (default float32).
DTYPE_ATTRIBUTE_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                 "RandomUniformLike", "EyeLike", "Bernoulli"})
ONNX_DOMAINS = ("", "ai.onnx")


def onnx_dtype(dtype) -> int | None:
    """numpy dtype, TensorProto int or None -> TensorProto int or None."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def numpy_dtype(dtype: int) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(dtype)


def dtype_name(dtype: int | None) -> str | None:
    return None if dtype is None else TensorProto.DataType.Name(dtype).lower()


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, opset: int, domain: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def node_schema(node: gs.Node, opset: int) -> onnx.defs.OpSchema | None:
    """The node's operator schema at the graph's default opset; None for non-ONNX domains."""
    domain = node.domain or ""
    if domain not in ONNX_DOMAINS:
        return None
    return _schema(node.op, opset, "")


def _formal(params: Sequence[onnx.defs.OpSchema.FormalParameter], index: int):
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return last
    return None


def formal_input_type(schema: onnx.defs.OpSchema, index: int) -> str | None:
    formal = _formal(schema.inputs, index)
    return None if formal is None else formal.type_str


def formal_output_type(schema: onnx.defs.OpSchema, index: int) -> str | None:
    formal = _formal(schema.outputs, index)
    return None if formal is None else formal.type_str


def _parse_type_str(type_str: str) -> int | None:
    """'tensor(float16)' -> FLOAT16; sequences, maps and optionals -> None."""
    if not type_str.startswith("tensor(") or not type_str.endswith(")"):
        return None
    try:
        return TensorProto.DataType.Value(type_str[len("tensor("):-1].upper())
    except ValueError:
        return None


def allowed_dtypes(schema: onnx.defs.OpSchema, type_str: str) -> frozenset[int]:
    """Element types a formal parameter accepts (a type parameter's constraint or a fixed type)."""
    for constraint in schema.type_constraints:
        if constraint.type_param_str == type_str:
            parsed = (_parse_type_str(t) for t in constraint.allowed_type_strs)
            return frozenset(t for t in parsed if t is not None)
    parsed = _parse_type_str(type_str)
    return frozenset() if parsed is None else frozenset({parsed})


def is_type_parameter(schema: onnx.defs.OpSchema, type_str: str) -> bool:
    return any(c.type_param_str == type_str for c in schema.type_constraints)


def tied_float_inputs(node: gs.Node, schema: onnx.defs.OpSchema | None) -> frozenset[int]:
    """Input indices whose type parameter also types another input or an output.

    These must all share one float type (e.g. MatMul A/B, LayerNormalization X/Scale/B), so a
    node computing in fp16 needs them in fp16. Inputs typed independently (Shape's data, Cast's
    input, Resize roi, Pow's exponent, Attention's mask) are left as they are. Without a schema
    (contrib domains) every input is taken to be tied.
    """
    if schema is None:
        return frozenset(range(len(node.inputs)))
    params = [formal_input_type(schema, i) for i in range(len(node.inputs))]
    output_params = {formal_output_type(schema, j) for j in range(len(schema.outputs))}
    tied = set()
    for index, param in enumerate(params):
        if param is None or not is_type_parameter(schema, param):
            continue
        if TensorProto.FLOAT16 not in allowed_dtypes(schema, param):
            continue
        if param in output_params or params.count(param) > 1:
            tied.add(index)
    return frozenset(tied)


def _attribute_dtype(node: gs.Node) -> int | None:
    if node.op == "Cast":
        return int(node.attrs["to"])
    if node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return onnx_dtype(value.export_dtype)
        if "value_float" in node.attrs or "value_floats" in node.attrs:
            return TensorProto.FLOAT
        return TensorProto.INT64 if ("value_int" in node.attrs or "value_ints" in node.attrs) else None
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return onnx_dtype(value.export_dtype) if isinstance(value, gs.Constant) else TensorProto.FLOAT
    if node.op in DTYPE_ATTRIBUTE_OPS and "dtype" in node.attrs:
        return int(node.attrs["dtype"])
    return None


def output_dtypes(node: gs.Node, input_dtypes: Sequence[int | None],
                  schema: onnx.defs.OpSchema | None) -> list[int | None]:
    """Element type of each output given the input types; None where the schema cannot tell."""
    from_attribute = _attribute_dtype(node)
    if from_attribute is not None:
        return [from_attribute] * len(node.outputs)
    if node.op == "CastLike" and len(input_dtypes) > 1:
        return [input_dtypes[1]]
    if schema is None:
        return [None] * len(node.outputs)
    input_params = [formal_input_type(schema, i) for i in range(len(node.inputs))]
    result = []
    for j in range(len(node.outputs)):
        param = formal_output_type(schema, j)
        result.append(None if param is None else _dtype_of_param(schema, param, input_params,
                                                                input_dtypes))
    return result


def _dtype_of_param(schema, param, input_params, input_dtypes) -> int | None:
    for index, input_param in enumerate(input_params):
        if input_param == param and index < len(input_dtypes) and input_dtypes[index] is not None:
            return input_dtypes[index]
    allowed = allowed_dtypes(schema, param)
    return next(iter(allowed)) if len(allowed) == 1 else None


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """Nodes producers-first, without reordering `graph.nodes` (Kahn's algorithm)."""
    producer_of = {id(out): node for node in graph.nodes for out in node.outputs}
    pending = {id(node): sum(1 for t in node.inputs if id(t) in producer_of) for node in graph.nodes}
    consumers: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if id(tensor) in producer_of:
                consumers.setdefault(id(producer_of[id(tensor)]), []).append(node)
    ready = [node for node in graph.nodes if pending[id(node)] == 0]
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for consumer in consumers.get(id(node), ()):
            pending[id(consumer)] -= 1
            if pending[id(consumer)] == 0:
                ready.append(consumer)
    if len(order) != len(graph.nodes):
        raise ValueError("graph has a cycle; it cannot be ordered")
    return order


def tensor_dtypes(graph: gs.Graph) -> dict[str, int]:
    """Element type of every tensor: graph inputs and constants, then forward through schemas,
    falling back to the type recorded on the tensor."""
    dtypes: dict[str, int] = {}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or tensor in graph.inputs:
            recorded = onnx_dtype(tensor.export_dtype if isinstance(tensor, gs.Constant)
                                  else tensor.dtype)
            if recorded is not None:
                dtypes[tensor.name] = recorded
    for node in topological_order(graph):
        inferred = output_dtypes(node, [dtypes.get(t.name) for t in node.inputs],
                                 node_schema(node, graph.opset))
        for out, dtype in zip(node.outputs, inferred):
            dtype = dtype if dtype is not None else onnx_dtype(out.dtype)
            if dtype is not None and not out.is_empty():
                dtypes[out.name] = dtype
    return dtypes
