"""Which nodes stay in fp32 when a graph is cast to fp16 (the "fp32 islands").

A node is in an island when
0. its operator schema has no fp16 variant for its float outputs (Range-11: float/double/int);
1. its op type is in `keep_fp32_op_types` (default below, each with its reason), or its name is
   in `keep_fp32_node_names`, or the range finder (graph/fp16_ranges.py) kept it: a value it
   computes or reads reached past the headroom threshold on sample inputs (`ranges`; with
   `ranges.whole_graph`, every node is in the island);
2. it feeds (through cheap elementwise / data-movement ops, back to graph inputs or constants)
   an op in `keep_fp32_upstream_of` — the timestep embedding `t · freqs` before Sin/Cos, whose
   arguments reach ~1000 where fp16's spacing is 0.5 rad;
3. it is a cheap op sandwiched between islands: every variable float input comes from an island
   and every consumer is an island (e.g. `Add(eps)` between ReduceMean and Sqrt of a norm).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_graphsurgeon as gs
from onnx import TensorProto

from sdcompile.graph.dtypes import (FLOAT_TYPES, allowed_dtypes, formal_input_type,
                                    formal_output_type, node_schema)
from sdcompile.graph.surgery import producer

# Default fp32 islands; the reason for each is the comment beside it.
DEFAULT_FP32_OP_TYPES = frozenset({
    # Group norm reduces over C/G·H·W elements (4·512² ≈ 1M in the SD VAE decoder at 512 px): an
    # fp16 sum of squares overflows 65504, and GroupNormalization-18 has no fp32 stash_type.
    "GroupNormalization",
    # The decomposed group norm torch's exporters write (Reshape → InstanceNormalization →
    # Reshape → Mul → Add): same reductions as above.
    "InstanceNormalization",
    # Mean / variance reductions of hand-decomposed norms, and sums over long axes.
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    # x² in decomposed variances overflows fp16 once |x| > 256.
    "Pow",
    # √variance: its input is an fp32 statistic that may exceed the fp16 range.
    "Sqrt",
    # exp overflows fp16 for x > 11.1 (timestep frequencies, decomposed softmax).
    "Exp",
    # Timestep-embedding phases t·f reach ~1000, where fp16's spacing (0.5) scrambles sin/cos.
    "Sin", "Cos",
    # Index arithmetic: fp16 represents integers exactly only up to 2048.
    "Range",
})
# Not kept by default, on purpose:
# - LayerNormalization: its stash_type (default 1) makes ONNX compute mean and variance in fp32
#   for fp16 X, and ONNX Runtime's CPU kernel for fp16 X keeps float statistics (U = float). Add
#   it to keep_fp32_op_types for a backend that reduces in fp16.
# - Softmax (unfused or inside Attention): kernels subtract the row max, so every exp ≤ 1, and
#   accumulate the row sum in fp32.
# - Erf (exact GELU): bounded in [-1, 1] with derivative ≤ 1.13, so fp16 keeps its relative error.
DEFAULT_FP32_UPSTREAM_OF = frozenset({"Sin", "Cos"})

# Ops too costly to pull into an island implicitly (rules 2 and 3 stop at them).
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention",
                       "MultiHeadAttention", "Einsum", "LayerNormalization",
                       "GroupNormalization", "InstanceNormalization", "Softmax", "Resize"})
# Ops an upstream chain (rule 2) may pass through.
CHAIN_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Neg", "Cast", "Unsqueeze", "Squeeze",
                       "Reshape", "Expand", "Concat", "Slice", "Gather", "Range", "Exp", "Log",
                       "Identity", "Transpose", "Flatten", "Tile", "Where", "Pow", "Sqrt",
                       "Reciprocal", "ConstantOfShape", "Constant"})


@dataclass(frozen=True)
class RangeKeep:
    """A node kept in fp32 because a value it computes or reads went past the threshold."""
    node: str
    op: str
    tensor: str       # the value past the threshold: one of the node's outputs or inputs
    max_abs: float    # max |x| of `tensor` on the sample inputs (inf when fp32 overflowed too)
    threshold: float


@dataclass(frozen=True)
class RangeIslands:
    """What the range finder decided for one graph."""
    threshold: float
    kept: tuple[RangeKeep, ...]  # graph order
    heavy_kept: int              # heavy ops the default policy casts (fp16_ranges.CAST_HEAVY_OPS) in `kept`
    heavy_total: int             # ... and in the graph
    whole_graph: bool            # so many heavy ops past the threshold that the graph stays fp32

    @property
    def node_names(self) -> frozenset[str]:
        return frozenset(k.node for k in self.kept)

    @classmethod
    def from_dict(cls, data: dict) -> RangeIslands:
        """The inverse of `plain_data` (a pass report as stored in a manifest)."""
        return cls(data["threshold"], tuple(RangeKeep(**k) for k in data["kept"]), data["heavy_kept"],
                   data["heavy_total"], data["whole_graph"])


class IoDtype(enum.Enum):
    """Element type of the float graph inputs and outputs after casting."""
    FP32 = "fp32"  # callers keep feeding and reading float32; Casts sit at the borders
    FP16 = "fp16"


@dataclass(frozen=True)
class Fp16Options:
    keep_fp32_op_types: frozenset[str] | None = None    # None: DEFAULT_FP32_OP_TYPES
    keep_fp32_node_names: frozenset[str] = frozenset()
    keep_fp32_upstream_of: frozenset[str] | None = None  # None: DEFAULT_FP32_UPSTREAM_OF
    io_dtype: IoDtype = IoDtype.FP32
    ranges: RangeIslands | None = None  # None: no range finder (rule 1 of the module doc)

    @property
    def fp32_op_types(self) -> frozenset[str]:
        if self.keep_fp32_op_types is None:
            return DEFAULT_FP32_OP_TYPES
        return frozenset(self.keep_fp32_op_types)

    @property
    def fp32_upstream_of(self) -> frozenset[str]:
        return (DEFAULT_FP32_UPSTREAM_OF if self.keep_fp32_upstream_of is None
                else frozenset(self.keep_fp32_upstream_of))


def _declared(node: gs.Node, options: Fp16Options, ranged: frozenset[str]) -> bool:
    return node.op in options.fp32_op_types or node.name in options.keep_fp32_node_names or node.name in ranged


def _fp32_only(node: gs.Node, opset: int) -> bool:
    """The type parameter shared by inputs and outputs allows float32 but not float16."""
    schema = node_schema(node, opset)
    if schema is None:
        return False
    input_params = {formal_input_type(schema, i) for i in range(len(node.inputs))}
    for index in range(len(node.outputs)):
        param = formal_output_type(schema, index)
        if param is None or param not in input_params:
            continue
        allowed = allowed_dtypes(schema, param)
        if TensorProto.FLOAT in allowed and TensorProto.FLOAT16 not in allowed:
            return True
    return False


def _upstream_chain(start: gs.Node) -> list[gs.Node]:
    """Producers of `start`'s inputs reachable through CHAIN_OPS only."""
    chain, stack, seen = [], [start], {id(start)}
    while stack:
        node = stack.pop()
        for tensor in node.inputs:
            source = producer(tensor)
            if source is None or id(source) in seen or source.op not in CHAIN_OPS:
                continue
            seen.add(id(source))
            chain.append(source)
            stack.append(source)
    return chain


def _sandwiched(node: gs.Node, island: set[int], dtypes: dict[str, int], graph_outputs) -> bool:
    if node.op in HEAVY_OPS or any(o is out for o in node.outputs for out in graph_outputs):
        return False
    variable_float = [t for t in node.inputs if isinstance(t, gs.Variable) and not t.is_empty()
                      and dtypes.get(t.name) in FLOAT_TYPES]
    consumers = [c for out in node.outputs for c in out.outputs]
    return (bool(variable_float) and bool(consumers)
            and all(producer(t) is not None and id(producer(t)) in island for t in variable_float)
            and all(id(c) in island for c in consumers))


def fp32_island_nodes(graph: gs.Graph, options: Fp16Options, dtypes: dict[str, int]) -> set[int]:
    """ids of the nodes that compute in fp32 under `options` (rules 0-3 of the module doc)."""
    if options.ranges is not None and options.ranges.whole_graph:
        return {id(n) for n in graph.nodes}
    ranged = frozenset() if options.ranges is None else options.ranges.node_names
    island = {id(n) for n in graph.nodes
              if _declared(n, options, ranged) or _fp32_only(n, graph.opset)}
    for node in graph.nodes:
        if node.op in options.fp32_upstream_of:
            island.update(id(n) for n in _upstream_chain(node))
    changed = True
    while changed:
        added = {id(n) for n in graph.nodes
                 if id(n) not in island and _sandwiched(n, island, dtypes, graph.outputs)}
        island |= added
        changed = bool(added)
    return island
