"""Find decomposed scaled dot-product attention by op structure (Vaswani et al. 2017, eq. 1).

Pattern, read backwards from each Softmax over the last axis of a 4-D score tensor:

    Q (B, H, Sq, d) ─[Mul/Div by scalar]─┐
                                        MatMul ─[Mul/Div by scalar]─[Add(mask)]─ Softmax ─ MatMul ─ Y
    Kᵀ (B, H, d, Sk) ─[Mul/Div by scalar]┘                                    V (B, H, Sk, dv) ┘

Kᵀ is traced back through Transposes (and the Reshape→Transpose→Reshape chain torch's
exporter writes for `k.transpose(-2, -1)` in SDPA's decomposition) to K itself; every scalar
found on the way is multiplied into one `scale`. An additive mask equal to −inf strictly above
the diagonal and 0 elsewhere (for every size of the unknown dims) is recognised as causal.

Self vs cross (structural rule): Q and K are each traced back through projection ops
(Transpose, Reshape, Squeeze/Unsqueeze, Flatten, Identity, Cast, Split, Slice, Gather, binary
arithmetic with a constant operand, MatMul/Gemm/Conv with constant weights) to the first tensor
that is a graph input or is produced by any other op. Same tensor: self-attention (e.g. both
projected from one LayerNorm output); different tensors: cross-attention (K/V projected from
`encoder_hidden_states`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from sdcompile.graph.constant_eval import scalar_value, sentinel_values
from sdcompile.graph.surgery import (compose_perms, node_label, producer, producer_op, rank,
                                     same_dim, sole_consumer, static_dim)

SWAP_LAST_TWO = (0, 1, 3, 2)
IDENTITY_4D = (0, 1, 2, 3)
# Mask values at or below this count as −inf (masks built with finfo(float32).min included).
MASK_NEG_INF = -1e30
FUSED_ATTENTION_OPS = frozenset({("", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                                 ("com.microsoft", "Attention")})
_VIEW_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                       "Cast", "Split", "Slice", "Gather"})
_BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
_WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv"})


class AttentionKind(enum.Enum):
    SELF = "self"
    CROSS = "cross"


@dataclass(frozen=True)
class AttentionMatch:
    """One decomposed attention; K = Transpose(key_source, key_perm) is (B, H, Sk, d)."""
    softmax: gs.Node
    output_matmul: gs.Node      # MatMul(probs, V); its output (B, H, Sq, dv) is the result
    query: gs.Tensor            # (B, H, Sq, d)
    key_source: gs.Tensor
    key_perm: tuple[int, ...]
    value: gs.Tensor            # (B, H, Sk, dv)
    scale: float
    mask: gs.Tensor | None      # additive, broadcastable to (B, H, Sq, Sk); None if causal/absent
    causal: bool
    kind: AttentionKind

    @property
    def name(self) -> str:
        return node_label(self.softmax)


@dataclass(frozen=True)
class UnmatchedAttention:
    """A Softmax between two MatMuls that could not be read as attention, and why."""
    name: str
    reason: str


def _scaled(tensor: gs.Tensor, opset: int) -> tuple[gs.Tensor, float] | None:
    """Peel one Mul/Div by a static scalar off `tensor`: (other operand, factor)."""
    node = producer_op(tensor, "Mul", "Div")
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if any(t.shape is not None and len(t.shape) > 4 for t in (a, b)):
        return None
    if node.op == "Div":
        divisor = scalar_value(b, opset)
        return None if divisor is None or divisor == 0 else (a, 1.0 / divisor)
    for operand, factor_tensor in ((a, b), (b, a)):
        factor = scalar_value(factor_tensor, opset)
        if factor is not None:
            return operand, factor
    return None


def _peel_scalars(tensor: gs.Tensor, opset: int) -> tuple[gs.Tensor, float]:
    factor = 1.0
    while (peeled := _scaled(tensor, opset)) is not None:
        tensor, f = peeled
        factor *= f
    return tensor, factor


def _swap_chain_source(tensor: gs.Tensor) -> gs.Tensor | None:
    """X when tensor = Reshape(Transpose(Reshape(X, (B·H, S, d)), (0, 2, 1)), (B, H, d, S))."""
    outer = producer_op(tensor, "Reshape")
    middle = producer_op(outer.inputs[0], "Transpose") if outer else None
    if middle is None or tuple(middle.attrs.get("perm", ())) != (0, 2, 1):
        return None
    inner = producer_op(middle.inputs[0], "Reshape")
    if inner is None:
        return None
    x, merged, out = inner.inputs[0], inner.outputs[0].shape, tensor.shape
    if x.shape is None or merged is None or out is None or len(x.shape) != 4:
        return None
    if len(merged) != 3 or len(out) != 4:
        return None
    xs = x.shape
    layout_kept = same_dim(merged[1], xs[2]) and same_dim(merged[2], xs[3])
    swapped = all(same_dim(o, xs[i]) for o, i in zip(out, SWAP_LAST_TWO))
    return x if layout_kept and swapped else None


def _peel_key(key_t: gs.Tensor, opset: int) -> tuple[gs.Tensor, tuple[int, ...], float]:
    """Kᵀ (B, H, d, Sk) -> (source, perm, factor) with Kᵀ = factor · Transpose(source, perm_t)
    and K = Transpose(source, perm), perm = perm_t followed by swapping the last two axes."""
    perm_t, factor, tensor = IDENTITY_4D, 1.0, key_t
    while True:
        tensor, f = _peel_scalars(tensor, opset)
        factor *= f
        transpose = producer_op(tensor, "Transpose")
        if transpose is not None and len(transpose.attrs.get("perm", ())) == 4:
            perm_t = compose_perms(tuple(transpose.attrs["perm"]), perm_t)
            tensor = transpose.inputs[0]
            continue
        chain_source = _swap_chain_source(tensor)
        if chain_source is not None:
            perm_t = compose_perms(SWAP_LAST_TWO, perm_t)
            tensor = chain_source
            continue
        return tensor, compose_perms(perm_t, SWAP_LAST_TWO), factor


def _is_constant_expr(tensor: gs.Tensor, depth: int = 6) -> bool:
    """Computed from constants and tensor shapes only (so carries no activations)."""
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    if node is not None and node.op == "Shape":
        return True
    if node is None or depth == 0:
        return False
    return all(_is_constant_expr(t, depth - 1) for t in node.inputs if not t.is_empty())


def _data_input(node: gs.Node) -> gs.Tensor | None:
    """The one non-constant operand of a projection op, or None if it is not a projection."""
    if (node.domain or "") != "":
        return None
    if node.op in _VIEW_OPS:
        return node.inputs[0]
    if node.op in _BINARY_OPS | _WEIGHTED_OPS:
        variable = [t for t in node.inputs if not t.is_empty() and not _is_constant_expr(t)]
        return variable[0] if len(variable) == 1 else None
    return None


def projection_source(tensor: gs.Tensor) -> gs.Tensor:
    """First tensor upstream of `tensor` not produced by a projection op (see module doc)."""
    seen = 0
    while (node := producer(tensor)) is not None and seen < 64:
        data = _data_input(node)
        if data is None:
            break
        tensor, seen = data, seen + 1
    return tensor


def _is_causal_mask(values: tuple[np.ndarray, ...]) -> bool:
    """−inf strictly above the diagonal, 0 on and below it, identical over leading dims."""
    for value in values:
        if value.ndim < 2 or value.ndim > 4 or value.shape[-1] != value.shape[-2]:
            return False
        if not np.issubdtype(value.dtype, np.floating):
            return False
        n = value.shape[-1]
        above = np.triu(np.ones((n, n), dtype=bool), 1)
        blocked = value <= MASK_NEG_INF
        if not (np.all(blocked == above) and np.all(value[..., ~above] == 0)):
            return False
    return True


def _softmax_is_last_axis(softmax: gs.Node, scores_rank: int, opset: int) -> bool:
    axis = softmax.attrs.get("axis", -1 if opset >= 13 else 1)
    return axis in (-1, scores_rank - 1)


@dataclass(frozen=True)
class _Scores:
    qk: gs.Node
    scale: float
    mask: gs.Tensor | None


def _path_to_matmul(tensor: gs.Tensor, opset: int):
    """(MatMul, scalar factor, tensors walked) from `tensor` back through scalar Mul/Div."""
    walked, factor = [tensor], 1.0
    while (peeled := _scaled(tensor, opset)) is not None:
        tensor, f = peeled
        factor *= f
        walked.append(tensor)
    node = producer_op(tensor, "MatMul")
    return None if node is None else (node, factor, walked)


def _read_scores(softmax: gs.Node, graph_outputs, opset: int) -> _Scores | str | None:
    """Softmax ← [Add(mask)] ← [Mul/Div by scalar]* ← MatMul; None if no MatMul is there."""
    scores, mask = softmax.inputs[0], None
    path = _path_to_matmul(scores, opset)
    add = producer_op(scores, "Add")
    if path is None and add is not None and len(add.inputs) == 2:
        for candidate, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            if (path := _path_to_matmul(candidate, opset)) is not None:
                mask, path = other, (path[0], path[1], [scores] + path[2])
                break
    if path is None:
        return None
    qk, scale, walked = path
    if any(sole_consumer(t, graph_outputs) is None for t in walked):
        return "attention scores are also used outside the attention"
    return _Scores(qk, scale, mask)


def _mask_reading(mask: gs.Tensor, opset: int) -> tuple[bool, int | None]:
    """(is causal, rank) of an additive mask; rank None when unknown."""
    values = sentinel_values(mask, opset)
    if values is not None and _is_causal_mask(values):
        return True, values[0].ndim
    if mask.shape is not None:
        return False, len(mask.shape)
    return False, None if values is None else values[0].ndim


def _key_shape(key_source: gs.Tensor, key_perm: tuple[int, ...]):
    return None if key_source.shape is None else [key_source.shape[p] for p in key_perm]


def _incompatible(q: gs.Tensor, key_shape, v: gs.Tensor) -> str | None:
    """Why Q, K, V cannot be Attention inputs without broadcasting, or None."""
    q_batch, q_heads = static_dim(q, 0), static_dim(q, 1)
    k_batch, k_heads = (key_shape[0], key_shape[1]) if key_shape else (None, None)
    v_batch, v_heads = static_dim(v, 0), static_dim(v, 1)
    for a, b in ((q_batch, k_batch), (k_batch, v_batch), (k_heads, v_heads)):
        if isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0 and a != b:
            return "Q, K and V batch/head dims differ (broadcasting MatMul)"
    if isinstance(q_heads, int) and isinstance(k_heads, int) and k_heads > 0 and q_heads % k_heads:
        return "query heads are not a multiple of key heads"
    return None


def match_attention(softmax: gs.Node, graph: gs.Graph) -> AttentionMatch | UnmatchedAttention | None:
    """Read the attention around `softmax`; None when its output is not the first operand of a
    MatMul (probabilities · V), i.e. when it is no attention at all."""
    opset, probs = graph.opset, softmax.outputs[0]
    pv = next((n for n in probs.outputs if n.op == "MatMul" and n.inputs[0] is probs), None)
    if pv is None:
        return None

    def unmatched(reason: str) -> UnmatchedAttention:
        return UnmatchedAttention(node_label(softmax), reason)

    scores = _read_scores(softmax, graph.outputs, opset)
    if scores is None:
        return unmatched("scores are not MatMul(Q, Kᵀ) [· scalar] [+ mask]")
    if isinstance(scores, str):
        return unmatched(scores)
    if sole_consumer(probs, graph.outputs) is None:
        return unmatched("attention probabilities are also used outside the attention")
    query, q_factor = _peel_scalars(scores.qk.inputs[0], opset)
    key_source, key_perm, k_factor = _peel_key(scores.qk.inputs[1], opset)
    value = pv.inputs[1]
    ranks = (rank(query), rank(key_source), rank(value))
    if None in ranks:
        return unmatched("Q, K, V shapes are unknown; run the cleanup pass (shape inference)")
    if ranks != (4, 4, 4):
        return unmatched(f"Q, K, V have ranks {ranks}; fusion needs 4-D (B, heads, S, d)")
    if not _softmax_is_last_axis(softmax, 4, opset):
        return unmatched("softmax is not over the key axis")
    reason = _incompatible(query, _key_shape(key_source, key_perm), value)
    if reason is not None:
        return unmatched(reason)
    causal, mask_rank = (False, 0) if scores.mask is None else _mask_reading(scores.mask, opset)
    if mask_rank is None or mask_rank > 4:
        return unmatched("mask rank is unknown or above 4")
    mask = None if causal else scores.mask
    if mask is not None and static_dim(mask, -1) == 1 and static_dim(value, 2) != 1:
        return unmatched("mask broadcasts along the key axis")
    kind = (AttentionKind.SELF if projection_source(query) is projection_source(key_source)
            else AttentionKind.CROSS)
    return AttentionMatch(softmax=softmax, output_matmul=pv, query=query, key_source=key_source,
                          key_perm=key_perm, value=value,
                          scale=scores.scale * q_factor * k_factor, mask=mask, causal=causal,
                          kind=kind)


def find_attention(graph: gs.Graph) -> tuple[tuple[AttentionMatch, ...],
                                             tuple[UnmatchedAttention, ...]]:
    """Every decomposed attention in the graph, and the candidates that did not match."""
    matches, unmatched = [], []
    for node in list(graph.nodes):
        if node.op != "Softmax" or (node.domain or "") != "":
            continue
        found = match_attention(node, graph)
        if isinstance(found, AttentionMatch):
            matches.append(found)
        elif found is not None:
            unmatched.append(found)
    return tuple(matches), tuple(unmatched)


def count_fused_attention(graph: gs.Graph) -> int:
    """Attention nodes already fused (ONNX Attention, ONNX Runtime contrib attention)."""
    return sum(1 for n in graph.nodes if ((n.domain or ""), n.op) in FUSED_ATTENTION_OPS)
