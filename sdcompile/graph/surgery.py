"""Small onnx-graphsurgeon helpers shared by the passes: copying, walking, rewiring."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

Dim = int | str | None


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """A copy safe to edit: `Graph.copy` shares the opset-import list, which export appends to."""
    copied = graph.copy()
    copied.import_domains = None if graph.import_domains is None else list(graph.import_domains)
    return copied


def node_label(node: gs.Node) -> str:
    """The node's name, or `Op(first output)` for unnamed nodes."""
    if node.name:
        return node.name
    return f"{node.op}({node.outputs[0].name})" if node.outputs else node.op


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def producer_op(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The tensor's producer when its op type is one of `ops`, else None."""
    node = producer(tensor)
    return node if node is not None and node.op in ops and (node.domain or "") == "" else None


def sole_consumer(tensor: gs.Tensor, graph_outputs: Sequence[gs.Tensor]) -> gs.Node | None:
    """The only node reading `tensor`, or None if several read it or it is a graph output."""
    if len(tensor.outputs) != 1 or any(tensor is out for out in graph_outputs):
        return None
    return tensor.outputs[0]


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of `old` at `new` (graph outputs are not touched)."""
    for consumer in list(old.outputs):
        consumer.inputs = [new if t is old else t for t in consumer.inputs]


def rank(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    return None if shape is None else len(shape)


def same_dim(a: Dim, b: Dim) -> bool:
    """Dims known equal: equal ints, or the same symbolic name."""
    return a is not None and a == b and not (isinstance(a, int) and a < 0)


def static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = tensor.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim >= 0 else None


def compose_perms(first: Sequence[int], then: Sequence[int]) -> tuple[int, ...]:
    """Perm of Transpose(Transpose(x, first), then) as one Transpose of x."""
    return tuple(first[p] for p in then)


def is_identity_perm(perm: Sequence[int]) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


class NameSource:
    """Fresh tensor/node names for one pass over a graph (one scan of existing names)."""

    def __init__(self, graph: gs.Graph):
        self._taken = set(graph.tensors().keys()) | {node.name for node in graph.nodes}

    def __call__(self, base: str) -> str:
        name, suffix = base, 0
        while name in self._taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self._taken.add(name)
        return name


def constant_values(constant: gs.Constant) -> np.ndarray:
    """The constant's values, read without keeping them in the graph.

    onnx-graphsurgeon's `Constant.values` replaces a lazily loaded tensor (one whose data stays in the
    model, or in its external-data file) with the loaded array on first access, so a pass that reads
    every weight once would end up holding all of them; a pass that replaces the constant needs the
    values only while it converts them.
    """
    lazy = constant._values
    return lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else constant.values


def has_subgraph(node: gs.Node) -> bool:
    """Whether the node carries a subgraph attribute (If, Loop, Scan): it is left as it is."""
    return next(iter(node.subgraphs()), None) is not None
