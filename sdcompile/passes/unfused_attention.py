"""Rewrite fused attention nodes back into MatMul → Softmax → MatMul, the inverse of
passes/fused_attention.py, for importers whose fused-attention support is young (TensorRT's
ONNX parser maps `Attention` only from 10.14). Each node becomes, on (B, H, S, d) tensors:

    Q (B, Hq, Sq, d) ── Mul(scale) ──┐
                                    MatMul ─[Add(causal)]─[Add(mask) | Where(mask)]─ Softmax ─ MatMul ─ Y
    K (B, Hkv, Sk, d) ── Transpose ──┘                                        V (B, Hkv, Sk, dv) ┘

The scale multiplies Q before the first MatMul: TensorRT's fusion wants Q or K scaled before
the first batched matrix multiply ("Fused Attention", TensorRT developer guide), and smaller
scores keep fp16 QKᵀ in range. The causal mask is −inf strictly above the diagonal of the
(Sq, Sk) scores (key j > query i masked, as Attention-23 defines `is_causal` without a
past-key cache): a constant when Sq and Sk are static, else Trilu over a −inf fill of the
scores' size. Everything computes in the type of Q (an fp16 graph stays fp16; Softmax is no
fp32 island, graph/fp16_policy.py), except where `softmax_precision` asks for another type.
One difference: a row whose boolean mask blocks every key gives NaN, where Attention-23 gives
a zero row.

Read:
- `Attention` (opset 23): Q/K/V 4-D, or 3-D (B, S, H·d) with `q_num_heads`/`kv_num_heads`;
  `scale` (default 1/√d), `is_causal`, a float or boolean `attn_mask`; as many key/value heads
  as query heads, or one (MatMul broadcasts it).
- `com.microsoft.MultiHeadAttention` as the fuse pass writes it: 3-D Q/K/V, `num_heads`,
  `scale`, `unidirectional` (square scores only), `attention_bias`.
Anything else (past key/value, extra outputs, softcap, grouped-query heads, packed QKV, bias,
key padding mask) stays fused and is reported with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from sdcompile.graph.attention_match import (SWAP_LAST_TWO, AttentionKind, UnmatchedAttention,
                                             projection_source)
from sdcompile.graph.dtypes import numpy_dtype, tensor_dtypes
from sdcompile.graph.pass_result import GraphResult, PassResult, model_from_graph
from sdcompile.graph.shape_inference import has_unknown_shapes, with_inferred_shapes
from sdcompile.graph.surgery import (NameSource, compose_perms, copy_graph, node_label,
                                     producer_op, rank, same_dim, static_dim)

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

MHA = ("com.microsoft", "MultiHeadAttention")
ATTENTION = ("", "Attention")
MHA_BIAS_INPUT = 5  # attention_bias (B|1, H|1, Sq, Sk); inputs 3, 4, 6.. are bias, padding, past
TO_HEADS = (0, 2, 1, 3)  # (B, S, H, d) <-> (B, H, S, d)
TO_HEADS_TRANSPOSED = compose_perms(TO_HEADS, SWAP_LAST_TWO)  # (B, S, H, d) -> (B, H, d, S)
SHAPE_SLICE_SINCE = 15  # Shape's start/end attributes


@dataclass(frozen=True)
class UnfuseCount:
    found: int = 0
    unfused: int = 0


@dataclass(frozen=True)
class UnfuseReport:
    self_attention: UnfuseCount
    cross_attention: UnfuseCount
    causal: UnfuseCount                 # a subset of self + cross
    not_unfused: tuple[UnmatchedAttention, ...] = field(default=())

    @property
    def unfused(self) -> int:
        return self.self_attention.unfused + self.cross_attention.unfused


@dataclass(frozen=True)
class _Plan:
    """One fused node as plain attention; `heads` set where Q/K/V are (B, S, H·d)."""
    node: gs.Node
    query: gs.Tensor
    key: gs.Tensor
    value: gs.Tensor
    heads: tuple[int, int] | None       # (query heads, key/value heads)
    scale: float
    causal: bool
    mask: gs.Tensor | None
    softmax_dtype: int | None           # softmax_precision when it differs from Q's type
    kind: AttentionKind

    @property
    def seq_axis(self) -> int:
        return 1 if self.heads else 2


def _used_beyond(node: gs.Node, graph: gs.Graph, inputs_from: int, allowed=()) -> bool:
    """Any optional input from `inputs_from` on (bar `allowed`) given, or an output past Y read."""
    extra_in = [t for i, t in enumerate(node.inputs) if i >= inputs_from and i not in allowed
                and not t.is_empty()]
    extra_out = [t for t in node.outputs[1:] if not t.is_empty()
                 and (t.outputs or any(t is o for o in graph.outputs))]
    return bool(extra_in or extra_out)


def _heads_problem(q: gs.Tensor, k: gs.Tensor, heads: tuple[int, int] | None) -> str | None:
    if heads is not None:
        q_heads, kv_heads = heads
        same = q_heads == kv_heads
    else:
        q_heads, kv_heads = q.shape[1], k.shape[1]
        same = same_dim(q_heads, kv_heads)
    if same or kv_heads == 1:
        return None
    return f"grouped-query attention ({q_heads} query heads, {kv_heads} key heads) is not decomposed"


def _head_size(q: gs.Tensor, heads: tuple[int, int] | None) -> int | None:
    width = static_dim(q, -1)
    if width is None:
        return None
    return width // heads[0] if heads else width


def _layout(node: gs.Node) -> tuple[tuple[int, int] | None, str | None]:
    """(heads to split, None) for 3-D inputs, (None, None) for 4-D, or (None, why not)."""
    q, k, v = node.inputs[:3]
    ranks = (rank(q), rank(k), rank(v))
    if ranks == (4, 4, 4):
        return None, None
    if ranks != (3, 3, 3):
        return None, f"Q, K, V ranks {ranks}: need all 4-D or all 3-D"
    if (node.domain, node.op) == MHA:
        heads = node.attrs.get("num_heads")
        return ((heads, heads), None) if heads else (None, "num_heads missing")
    q_heads, kv_heads = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
    if not (q_heads and kv_heads):
        return None, "3-D Q, K, V without q_num_heads and kv_num_heads"
    return (q_heads, kv_heads), None


def _mask_and_causal(node: gs.Node) -> tuple[gs.Tensor | None, bool, str | None]:
    """(additive or boolean mask, causal, why not) as the node states them."""
    q, k = node.inputs[:2]
    if (node.domain, node.op) == MHA:
        causal = bool(node.attrs.get("unidirectional", 0))
        if causal and not same_dim(q.shape[1], k.shape[1]):
            return None, True, "unidirectional over unequal query and key lengths (aligned bottom-right)"
        mask_index = MHA_BIAS_INPUT
    else:
        causal, mask_index = bool(node.attrs.get("is_causal", 0)), 3
        if node.attrs.get("softcap", 0.0):
            return None, causal, "softcap is not decomposed"
    mask = node.inputs[mask_index] if len(node.inputs) > mask_index else None
    return (None if mask is None or mask.is_empty() else mask), causal, None


def read_fused(node: gs.Node, graph: gs.Graph, dtypes: dict[str, int]) -> _Plan | str:
    """The plan that unfuses `node`, or why it stays fused."""
    is_mha = (node.domain, node.op) == MHA
    if _used_beyond(node, graph, 3, allowed=(MHA_BIAS_INPUT,) if is_mha else (3,)):
        return "past key/value, bias, padding mask or extra outputs are not decomposed"
    q, k, v = node.inputs[:3]
    if dtypes.get(q.name) is None:
        return "the element type of Q is unknown; run the cleanup pass (shape inference)"
    heads, problem = _layout(node)
    if problem:
        return problem
    mask, causal, problem = _mask_and_causal(node)
    problem = problem or _heads_problem(q, k, heads)
    if problem:
        return problem
    scale = node.attrs.get("scale") or None  # MultiHeadAttention writes 0 for "default"
    if scale is None:
        head_size = _head_size(q, heads)
        if head_size is None:
            return "the default scale 1/√d needs a static head size"
        scale = 1.0 / math.sqrt(head_size)
    softmax_dtype = node.attrs.get("softmax_precision")
    kind = AttentionKind.SELF if projection_source(q) is projection_source(k) else AttentionKind.CROSS
    return _Plan(node, q, k, v, heads, float(scale), causal, mask,
                 softmax_dtype if softmax_dtype not in (None, dtypes.get(q.name)) else None, kind)


class _Writer:
    """Adds typed single-output nodes to one graph."""

    def __init__(self, graph: gs.Graph, dtypes: dict[str, int]):
        self.graph, self.dtypes, self.names = graph, dtypes, NameSource(graph)

    def op(self, op: str, inputs: list, base: str, dtype: int, attrs: dict | None = None,
           output: gs.Tensor | None = None) -> gs.Tensor:
        out = output if output is not None else gs.Variable(self.names(base))
        out.dtype = numpy_dtype(dtype)
        self.graph.layer(op=op, name=self.names(f"{base}_node"), inputs=inputs, outputs=[out],
                         attrs=attrs or {})
        self.dtypes[out.name] = dtype
        return out

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(base), values)


def _to_heads(w: _Writer, tensor: gs.Tensor, heads: int, perm, base: str, dtype: int) -> gs.Tensor:
    """(B, S, H·d) -> Transpose(Reshape(x, (B, S, H, d)), perm)."""
    split = w.constant(f"{base}_split_shape", np.array([0, 0, heads, -1], dtype=np.int64))
    bshd = w.op("Reshape", [tensor, split], f"{base}_bshd", dtype)
    return w.op("Transpose", [bshd], f"{base}_heads", dtype, {"perm": list(perm)})


def _key_transposed(w: _Writer, plan: _Plan, base: str, dtype: int) -> gs.Tensor:
    """Kᵀ (B, Hkv, d, Sk), folding a Transpose that produces K into one."""
    if plan.heads:
        return _to_heads(w, plan.key, plan.heads[1], TO_HEADS_TRANSPOSED, f"{base}_key", dtype)
    source, perm = plan.key, SWAP_LAST_TWO
    transpose = producer_op(plan.key, "Transpose")
    if transpose is not None and len(transpose.attrs.get("perm", ())) == 4:
        source, perm = transpose.inputs[0], compose_perms(tuple(transpose.attrs["perm"]), SWAP_LAST_TWO)
    return w.op("Transpose", [source], f"{base}_key_t", dtype, {"perm": list(perm)})


def _causal_mask(w: _Writer, plan: _Plan, base: str, dtype: int) -> gs.Tensor | None:
    """(Sq, Sk): −inf where key j > query i, else 0; None when the graph's opset cannot size it."""
    axis = plan.seq_axis
    sq, sk = static_dim(plan.query, axis), static_dim(plan.key, axis)
    if sq is not None and sk is not None:
        blocked = np.triu(np.ones((sq, sk), dtype=bool), 1)
        return w.constant(f"{base}_causal_mask", np.where(blocked, -np.inf, 0).astype(numpy_dtype(dtype)))
    if w.graph.opset < SHAPE_SLICE_SINCE:
        return None
    span = {"start": axis, "end": axis + 1}
    sizes = w.op("Concat", [w.op("Shape", [plan.query], f"{base}_q_len", TensorProto.INT64, span),
                            w.op("Shape", [plan.key], f"{base}_k_len", TensorProto.INT64, span)],
                 f"{base}_scores_size", TensorProto.INT64, {"axis": 0})
    fill = gs.Constant(w.names(f"{base}_neg_inf"), np.array([-np.inf], dtype=numpy_dtype(dtype)))
    full = w.op("ConstantOfShape", [sizes], f"{base}_blocked", dtype, {"value": fill})
    one = w.constant(f"{base}_above_diagonal", np.array(1, dtype=np.int64))
    return w.op("Trilu", [full, one], f"{base}_causal_mask", dtype, {"upper": 1})


def _masked(w: _Writer, plan: _Plan, scores: gs.Tensor, base: str, dtype: int) -> gs.Tensor:
    mask_dtype = w.dtypes.get(plan.mask.name)
    if mask_dtype == TensorProto.BOOL:
        neg_inf = w.constant(f"{base}_neg_inf", np.array(-np.inf, dtype=numpy_dtype(dtype)))
        return w.op("Where", [plan.mask, scores, neg_inf], f"{base}_masked", dtype)
    mask = plan.mask if mask_dtype == dtype else w.op("Cast", [plan.mask], f"{base}_mask_cast", dtype,
                                                       {"to": dtype})
    return w.op("Add", [scores, mask], f"{base}_masked", dtype)


def _probabilities(w: _Writer, plan: _Plan, scores: gs.Tensor, base: str, dtype: int) -> gs.Tensor:
    if plan.softmax_dtype is None:
        return w.op("Softmax", [scores], f"{base}_probs", dtype, {"axis": -1})
    wide = w.op("Cast", [scores], f"{base}_scores_cast", plan.softmax_dtype, {"to": plan.softmax_dtype})
    probs = w.op("Softmax", [wide], f"{base}_probs_wide", plan.softmax_dtype, {"axis": -1})
    return w.op("Cast", [probs], f"{base}_probs", dtype, {"to": dtype})


def unfuse_one(w: _Writer, plan: _Plan) -> bool:
    """Write the decomposition of `plan.node` and take over its output; False if it cannot."""
    base, dtype = node_label(plan.node), w.dtypes[plan.query.name]
    causal = _causal_mask(w, plan, base, dtype) if plan.causal else None
    if plan.causal and causal is None:
        return False
    query, value = plan.query, plan.value
    if plan.heads:
        query = _to_heads(w, query, plan.heads[0], TO_HEADS, f"{base}_query", dtype)
        value = _to_heads(w, value, plan.heads[1], TO_HEADS, f"{base}_value", w.dtypes[value.name])
    scale = w.constant(f"{base}_scale", np.array(plan.scale, dtype=numpy_dtype(dtype)))
    scaled = w.op("Mul", [query, scale], f"{base}_query_scaled", dtype)
    scores = w.op("MatMul", [scaled, _key_transposed(w, plan, base, dtype)], f"{base}_scores", dtype)
    if causal is not None:
        scores = w.op("Add", [scores, causal], f"{base}_causal", dtype)
    if plan.mask is not None:
        scores = _masked(w, plan, scores, base, dtype)
    probs = _probabilities(w, plan, scores, base, dtype)
    result = plan.node.outputs[0]
    plan.node.outputs.clear()
    if plan.heads is None:
        w.op("MatMul", [probs, value], base, dtype, output=result)
        return True
    attended = w.op("MatMul", [probs, value], f"{base}_attended", dtype)
    merged = w.op("Transpose", [attended], f"{base}_attended_bshd", dtype, {"perm": list(TO_HEADS)})
    merge = w.constant(f"{base}_merge_shape", np.array([0, 0, -1], dtype=np.int64))
    w.op("Reshape", [merged, merge], base, dtype, output=result)
    return True


def _count(plans, unfused: set, predicate) -> UnfuseCount:
    chosen = [p for p in plans if predicate(p)]
    return UnfuseCount(found=len(chosen), unfused=sum(1 for p in chosen if id(p.node) in unfused))


def unfuse_attention(graph: gs.Graph) -> GraphResult:
    """Decompose every fused attention node of `graph` (not modified) that can be."""
    g = copy_graph(graph)
    if has_unknown_shapes(g):
        g = with_inferred_shapes(g)
    writer = _Writer(g, tensor_dtypes(g))
    plans, skipped = [], []
    for node in [n for n in g.nodes if ((n.domain or ""), n.op) in (ATTENTION, MHA)]:
        plan = read_fused(node, g, writer.dtypes)
        if isinstance(plan, str):
            skipped.append(UnmatchedAttention(node_label(node), plan))
        else:
            plans.append(plan)
    unfused = set()
    for plan in plans:
        if unfuse_one(writer, plan):
            unfused.add(id(plan.node))
        else:
            skipped.append(UnmatchedAttention(node_label(plan.node),
                                              f"a run-time causal mask needs opset >= {SHAPE_SLICE_SINCE}"))
    g.cleanup().toposort()
    report = UnfuseReport(
        self_attention=_count(plans, unfused, lambda p: p.kind is AttentionKind.SELF),
        cross_attention=_count(plans, unfused, lambda p: p.kind is AttentionKind.CROSS),
        causal=_count(plans, unfused, lambda p: p.causal), not_unfused=tuple(skipped))
    return GraphResult(g, report)


def run(model: onnx.ModelProto, options: PassOptions) -> PassResult:
    result = unfuse_attention(gs.import_onnx(model))
    return PassResult(model_from_graph(result.graph, model), result.report)
