"""ONNX shape/type inference and full model checks, also for models over protobuf's 2 GiB.

Inference needs the weights' types and shapes, not their values: it runs on a light copy in
which every large initializer is declared as a graph input of the same type and shape, and the
inferred types are copied back. ONNX infers nothing for GroupNormalization, so the light copy
has an Identity in its place (same type and shape as its input). The full model check also
validates the weights, so a model at or above the in-memory limit is written once to a
temporary folder with external data and checked from the file.
"""
from __future__ import annotations


import onnx
import onnx_graphsurgeon as gs

from sdcompile.graph.surgery import copy_graph

# Protobuf refuses to serialise a message of 2 GiB or more; keep a margin for the graph itself.
# Initializers up to this many elements keep their values (shape arithmetic reads them).
SMALL_INITIALIZER_ELEMENTS = 1024
# Ops ONNX inference leaves untyped although their output has the type and shape of input 0;
# the light copy stands in an Identity for them.
SHAPE_PRESERVING_UNINFERRED_OPS = frozenset({"GroupNormalization"})
SPECIALISATION_BASES = (7, 19)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in the model's initializers (raw or typed fields)."""
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    return total


def _elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _inference_stand_in(node: onnx.NodeProto) -> onnx.NodeProto:
    if node.domain in ("", "ai.onnx") and node.op_type in SHAPE_PRESERVING_UNINFERRED_OPS:
        return onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]])
    return node


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each large initializer replaced by a graph input of its type and shape
    (and stand-ins for SHAPE_PRESERVING_UNINFERRED_OPS)."""
    graph = model.graph
    declared = {i.name for i in graph.input}
    small = [t for t in graph.initializer if _elements(t) <= SMALL_INITIALIZER_ELEMENTS]
    large_inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                    for t in graph.initializer
                    if _elements(t) > SMALL_INITIALIZER_ELEMENTS and t.name not in declared]
    light_graph = onnx.helper.make_graph(
        [_inference_stand_in(n) for n in graph.node], graph.name,
        list(graph.input) + large_inputs, list(graph.output),
        initializer=small, value_info=list(graph.value_info))
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import),
                                   functions=list(model.functions))
    light.ir_version = model.ir_version
    return light


def _with_types_of(model: onnx.ModelProto, inferred: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.ClearField("value_info")
    result.graph.value_info.extend(inferred.graph.value_info)
    for out, typed in zip(result.graph.output, inferred.graph.output):
        if typed.type.tensor_type.HasField("shape") or not out.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(typed.type)
    return result


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with ONNX shape/type inference (with data propagation) applied."""
    inferred = onnx.shape_inference.infer_shapes(_light_copy(model), data_prop=True)
    return _with_types_of(model, inferred)


def check_model_types(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model(full_check=True)` after shape inference (which fills in the graph
    outputs' shapes the checker requires), on the light copy: large initializers stand in as typed
    graph inputs, so no weight is copied, serialized or read from external data, at any model size."""
    light = _light_copy(model)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    onnx.checker.check_model(_with_types_of(light, inferred), full_check=True)


def _with_input_dims(model: onnx.ModelProto, base: int) -> onnx.ModelProto:
    """A copy whose symbolic/unknown graph-input dims are concrete: symbol i -> base + i."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    symbols: dict[str, int] = {}
    for graph_input in copy.graph.input:
        for index, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                key = dim.dim_param or f"{graph_input.name}:{index}"
                dim.dim_value = base + symbols.setdefault(key, len(symbols))
    return copy


def _dims_by_name(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    found = {}
    for info in list(model.graph.value_info) + list(model.graph.output):
        if info.type.tensor_type.HasField("shape"):
            found[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                for d in info.type.tensor_type.shape.dim]
    return found


def _is_unknown(dim: onnx.TensorShapeProto.Dimension) -> bool:
    return not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith("unk__"))


def _has_unknown_inner_dims(model: onnx.ModelProto) -> bool:
    return any(_is_unknown(d) for info in list(model.graph.value_info) + list(model.graph.output)
               for d in info.type.tensor_type.shape.dim)


def static_dims_recovered(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in inner dims that inference left unknown but that are static.

    ONNX inference cannot divide symbols, so `Reshape((B, S, 8), (B, S, 2, -1))` leaves the last
    dim unknown. Inferring again with two concrete sizes for every symbolic input dim (7.. and
    19..) shows which unknown dims come out the same both times; those are static.
    """
    if not _has_unknown_inner_dims(model):
        return model
    light = _light_copy(model)
    first, second = (_dims_by_name(onnx.shape_inference.infer_shapes(
        _with_input_dims(light, base), data_prop=True)) for base in SPECIALISATION_BASES)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for info in list(result.graph.value_info) + list(result.graph.output):
        a, b = first.get(info.name), second.get(info.name)
        dims = info.type.tensor_type.shape.dim
        if a is None or b is None or not len(a) == len(b) == len(dims):
            continue
        for dim, x, y in zip(dims, a, b):
            if _is_unknown(dim) and x is not None and x == y:
                dim.dim_value = x
    return result


def _forget_inner_types(graph: gs.Graph) -> None:
    """Drop recorded types/shapes of inner tensors so inference recomputes them afresh."""
    boundary = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary:
            tensor.dtype, tensor.shape = None, None


def has_unknown_shapes(graph: gs.Graph) -> bool:
    """Some inner tensor lacks a shape, or has a dim that is neither static nor named."""
    def unknown(dim) -> bool:
        return dim is None or (isinstance(dim, str) and dim.startswith("unk__"))
    return any(isinstance(t, gs.Variable) and (t.shape is None or any(unknown(d) for d in t.shape))
               for t in graph.tensors().values())


def _weightless(graph: gs.Graph) -> gs.Graph:
    """A copy of `graph` whose large constants are graph inputs of the same type and shape."""
    light = copy_graph(graph)
    for tensor in list(light.tensors().values()):
        if not isinstance(tensor, gs.Constant) or _volume(tensor.shape) <= SMALL_INITIALIZER_ELEMENTS:
            continue
        stand_in = gs.Variable(tensor.name, dtype=tensor.export_dtype, shape=list(tensor.shape))
        for consumer in list(tensor.outputs):
            consumer.inputs = [stand_in if t is tensor else t for t in consumer.inputs]
        light.inputs.append(stand_in)
    return light


def _volume(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _type_of(info: onnx.ValueInfoProto):
    tensor_type = info.type.tensor_type
    if not tensor_type.elem_type:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return dtype, None
    return dtype, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                   for d in tensor_type.shape.dim]


def _inferred_types(graph: gs.Graph) -> dict[str, tuple]:
    light = _weightless(graph)
    try:
        inferred = infer_shapes(gs.export_onnx(light, do_type_check=False))
    except onnx.shape_inference.InferenceError:
        _forget_inner_types(light)
        inferred = infer_shapes(gs.export_onnx(light, do_type_check=False))
    inferred = static_dims_recovered(inferred)
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    return {info.name: typed for info in infos if (typed := _type_of(info)) is not None}


def with_inferred_shapes(graph: gs.Graph) -> gs.Graph:
    """A copy of `graph` with every tensor's type and shape inferred (weights are not copied).

    Shapes recorded by the exporter are kept where they agree with inference; if they
    conflict, inference starts over from the graph inputs alone.
    """
    result = copy_graph(graph)
    types = _inferred_types(result)
    for name, tensor in result.tensors().items():
        if isinstance(tensor, gs.Variable) and name in types:
            dtype, shape = types[name]
            tensor.dtype = dtype
            tensor.shape = shape if shape is not None else tensor.shape
    return result
