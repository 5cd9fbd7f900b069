"""Count nodes by the float type they compute in, and find fp32 compute outside the islands.

A node's compute type is the type of its first float output, or for float-consuming nodes
with non-float outputs (Equal, Less) of its tied float inputs. Casts and shape-only nodes
(Shape, Size, and anything on integer tensors only) have none and are not counted.

The audit also says what the range finder (graph/fp16_ranges.py) decided: the nodes it kept, each
with the value past the threshold and its observed max |x|, or that it kept the whole graph.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_graphsurgeon as gs
from onnx import TensorProto

from sdcompile.graph.dtypes import (FLOAT_TYPES, node_schema, tensor_dtypes,
                                    tied_float_inputs)
from sdcompile.graph.fp16_policy import Fp16Options, RangeIslands, fp32_island_nodes
from sdcompile.graph.surgery import node_label

NOT_COMPUTE_OPS = frozenset({"Cast", "CastLike", "Constant", "Shape", "Size"})


class RangeVerdict(enum.Enum):
    NOT_RUN = "not run"            # no sample ranges in the options
    NOTHING_KEPT = "nothing kept"  # no value went past the threshold
    ISLANDS = "islands"            # the nodes of `ranges.kept` are fp32
    WHOLE_GRAPH = "whole graph"    # too many heavy ops past the threshold: every node is fp32


@dataclass(frozen=True)
class PrecisionAudit:
    fp16_nodes: int
    fp32_nodes: int
    fp32_island_nodes: tuple[str, ...]        # fp32 nodes the policy keeps in fp32
    fp32_outside_islands: tuple[str, ...]     # fp32 nodes the policy would have cast
    range_verdict: RangeVerdict = RangeVerdict.NOT_RUN  # what the range finder (`Fp16Options.ranges`) did
    ranges: RangeIslands | None = None        # the range finder's kept nodes, each with its value and max |x|

    @property
    def only_islands_in_fp32(self) -> bool:
        return not self.fp32_outside_islands


def compute_dtype(node: gs.Node, dtypes: dict[str, int], opset: int) -> int | None:
    """The float type `node` computes in, or None for casts and non-float nodes."""
    if node.op in NOT_COMPUTE_OPS:
        return None
    for out in node.outputs:
        if dtypes.get(out.name) in FLOAT_TYPES:
            return dtypes[out.name]
    for index in sorted(tied_float_inputs(node, node_schema(node, opset))):
        if index < len(node.inputs) and dtypes.get(node.inputs[index].name) in FLOAT_TYPES:
            return dtypes[node.inputs[index].name]
    return None


def range_verdict(ranges: RangeIslands | None) -> RangeVerdict:
    if ranges is None:
        return RangeVerdict.NOT_RUN
    if ranges.whole_graph:
        return RangeVerdict.WHOLE_GRAPH
    return RangeVerdict.ISLANDS if ranges.kept else RangeVerdict.NOTHING_KEPT


def describe_ranges(ranges: RangeIslands | None) -> list[str]:
    """One line for the verdict, then one per kept node: name (op): value, max |x| > threshold."""
    verdict = range_verdict(ranges)
    if ranges is None:
        return [f"range finder: {verdict.value}"]
    head = (f"range finder: {verdict.value} (threshold {ranges.threshold:g}; "
            f"{ranges.heavy_kept} of {ranges.heavy_total} heavy ops past it)")
    return [head, *(f"  {k.node} ({k.op}): {k.tensor} max |x| {k.max_abs:.4g} > {k.threshold:g}"
                    for k in ranges.kept)]


def audit_precision(graph: gs.Graph, options: Fp16Options | None = None) -> PrecisionAudit:
    """fp16/fp32 node counts and the fp32 compute nodes that are not in the islands of
    `options` (default policy when None)."""
    options = options or Fp16Options()
    dtypes = tensor_dtypes(graph)
    island = fp32_island_nodes(graph, options, dtypes)
    by_type = {id(n): compute_dtype(n, dtypes, graph.opset) for n in graph.nodes}
    fp32 = [n for n in graph.nodes if by_type[id(n)] == TensorProto.FLOAT]
    return PrecisionAudit(
        fp16_nodes=sum(1 for t in by_type.values() if t == TensorProto.FLOAT16),
        fp32_nodes=len(fp32),
        fp32_island_nodes=tuple(node_label(n) for n in fp32 if id(n) in island),
        fp32_outside_islands=tuple(node_label(n) for n in fp32 if id(n) not in island),
        range_verdict=range_verdict(options.ranges), ranges=options.ranges)
