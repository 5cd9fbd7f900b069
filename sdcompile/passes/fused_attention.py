"""Replace decomposed attention (see graph/attention_match.py) with one fused node.

Targets:
- `AttentionTarget.ONNX`: the standard `Attention` operator (opset 23) on the 4-D (B, H, S, d)
  tensors; scale folded into `scale`, a causal mask into `is_causal=1`, any other additive mask
  passed as `attn_mask`. Runs on ONNX Runtime CPU (>= 1.23) and TensorRT (>= 10.14).
- `AttentionTarget.ORT_MHA`: ONNX Runtime's `com.microsoft.MultiHeadAttention` for its CUDA
  provider, on (B, S, H·d) tensors with `num_heads`; causal as `unidirectional=1`, other masks as
  `attention_bias` (B|1, H|1, Sq, Sk). Head count and head sizes must be static.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdcompile.options import AttentionTarget
from sdcompile.graph.attention_match import (IDENTITY_4D, AttentionKind, AttentionMatch,
                                             UnmatchedAttention, count_fused_attention,
                                             find_attention)
from sdcompile.graph.opset import upgrade_opset_in_place
from sdcompile.graph.pass_result import GraphResult, PassResult, model_from_graph
from sdcompile.graph.shape_inference import has_unknown_shapes, with_inferred_shapes
from sdcompile.graph.surgery import (NameSource, compose_perms, copy_graph, is_identity_perm,
                                     producer_op, same_dim, sole_consumer, static_dim)
from sdrun.errors import UserError

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

ATTENTION_OPSET = 23
MHA_DOMAIN = "com.microsoft"
TO_BSHD = (0, 2, 1, 3)  # (B, H, S, d) <-> (B, S, H, d)


@dataclass(frozen=True)
class AttentionOptions:
    target: AttentionTarget = AttentionTarget.ONNX
    opset: int | None = None  # default-domain opset for the ONNX target; None: 23


@dataclass(frozen=True)
class AttentionCount:
    found: int = 0
    fused: int = 0


@dataclass(frozen=True)
class AttentionReport:
    target: AttentionTarget
    self_attention: AttentionCount
    cross_attention: AttentionCount
    causal: AttentionCount          # a subset of self + cross
    already_fused: int              # fused attention nodes present in the input graph
    not_fused: tuple[UnmatchedAttention, ...] = field(default=())

    @property
    def found(self) -> int:
        return self.self_attention.found + self.cross_attention.found

    @property
    def fused(self) -> int:
        return self.self_attention.fused + self.cross_attention.fused


def _target_opset(options: AttentionOptions) -> int:
    opset = ATTENTION_OPSET if options.opset is None else options.opset
    if options.target is AttentionTarget.ONNX and opset < ATTENTION_OPSET:
        raise UserError("The ONNX Attention operator needs a newer opset.",
                        expected=f"target opset >= {ATTENTION_OPSET}", got=f"opset {opset}",
                        fix=f"pass opset >= {ATTENTION_OPSET}, or target "
                            f"{AttentionTarget.ORT_MHA.value!r} (ONNX Runtime contrib op)")
    return opset


def _transposed(tensor: gs.Tensor, perm, names: NameSource, graph: gs.Graph) -> gs.Tensor:
    if is_identity_perm(perm):
        return tensor
    (out,) = graph.layer(op="Transpose", name=names(f"{tensor.name}_transpose"),
                         inputs=[tensor], outputs=[names(f"{tensor.name}_transposed")],
                         attrs={"perm": list(perm)})
    out.dtype = tensor.dtype
    return out


def _emit_onnx_attention(match: AttentionMatch, graph: gs.Graph, names: NameSource) -> None:
    key = _transposed(match.key_source, match.key_perm, names, graph)
    inputs = [match.query, key, match.value] + ([match.mask] if match.mask is not None else [])
    attrs = {"scale": float(match.scale)}
    if match.causal:
        attrs["is_causal"] = 1
    result = match.output_matmul.outputs[0]
    match.output_matmul.outputs.clear()
    graph.layer(op="Attention", name=names(f"{match.name}_attention"), inputs=inputs,
                outputs=[result], attrs=attrs)


def _through_transposes(tensor: gs.Tensor, perm) -> tuple[gs.Tensor, tuple[int, ...]]:
    """Fold producing 4-D Transposes into `perm`: same view, earlier tensor."""
    while (transpose := producer_op(tensor, "Transpose")) is not None:
        if len(transpose.attrs.get("perm", ())) != 4:
            break
        perm, tensor = compose_perms(tuple(transpose.attrs["perm"]), perm), transpose.inputs[0]
    return tensor, tuple(perm)


def _split_heads_source(bshd: gs.Tensor, hidden: int) -> gs.Tensor | None:
    """Y (B, S, H·d) when bshd = Reshape(Y, (B, S, H, d))."""
    reshape = producer_op(bshd, "Reshape")
    if reshape is None or bshd.shape is None:
        return None
    source = reshape.inputs[0]
    shape = source.shape
    if shape is None or len(shape) != 3 or shape[2] != hidden:
        return None
    leading_kept = same_dim(shape[0], bshd.shape[0]) and same_dim(shape[1], bshd.shape[1])
    return source if leading_kept else None


def _to_bsd(tensor: gs.Tensor, perm, hidden: int, names: NameSource, graph: gs.Graph) -> gs.Tensor:
    """(B, S, H·d) view of the 4-D (B, H, S, d) tensor Transpose(tensor, perm)."""
    tensor, perm = _through_transposes(tensor, perm)
    to_bshd = compose_perms(perm, TO_BSHD)
    if is_identity_perm(to_bshd) and (source := _split_heads_source(tensor, hidden)) is not None:
        return source
    bshd = _transposed(tensor, to_bshd, names, graph)
    shape = gs.Constant(names(f"{tensor.name}_bsd_shape"),
                        np.array([0, 0, hidden], dtype=np.int64))
    (out,) = graph.layer(op="Reshape", name=names(f"{tensor.name}_to_bsd"), inputs=[bshd, shape],
                         outputs=[names(f"{tensor.name}_bsd")])
    out.dtype = tensor.dtype
    return out


def _merged_heads_output(result: gs.Tensor, hidden: int, graph: gs.Graph) -> gs.Tensor | None:
    """The (B, S, H·dv) tensor when the result only feeds Transpose(TO_BSHD) → Reshape to 3-D."""
    transpose = sole_consumer(result, graph.outputs)
    if transpose is None or transpose.op != "Transpose":
        return None
    if tuple(transpose.attrs.get("perm", ())) != TO_BSHD:
        return None
    reshape = sole_consumer(transpose.outputs[0], graph.outputs)
    if reshape is None or reshape.op != "Reshape":
        return None
    merged, dims = reshape.outputs[0], result.shape  # dims: (B, H, Sq, dv)
    shape = merged.shape
    if shape is None or dims is None or len(shape) != 3 or shape[2] != hidden:
        return None
    return merged if same_dim(shape[0], dims[0]) and same_dim(shape[1], dims[2]) else None


def _attention_bias(mask: gs.Tensor, names: NameSource, graph: gs.Graph) -> gs.Tensor:
    """The additive mask as (B|1, H|1, Sq, Sk)."""
    missing = 4 - (len(mask.shape) if mask.shape is not None else 4)
    if missing == 0:
        return mask
    if isinstance(mask, gs.Constant):
        values = mask.values
        return gs.Constant(names(f"{mask.name}_4d"), values.reshape((1,) * missing + values.shape))
    (out,) = graph.layer(op="Unsqueeze", name=names(f"{mask.name}_unsqueeze"),
                         inputs=[mask, gs.Constant(names(f"{mask.name}_axes"),
                                                   np.arange(missing, dtype=np.int64))],
                         outputs=[names(f"{mask.name}_4d")])
    out.dtype = mask.dtype
    return out


def _mha_shape_problem(match: AttentionMatch) -> str | None:
    heads, head_dim, value_dim = (static_dim(match.query, 1), static_dim(match.query, 3),
                                  static_dim(match.value, 3))
    key_heads = static_dim(match.key_source, match.key_perm[1])
    if None in (heads, head_dim, value_dim) or key_heads != heads:
        return "MultiHeadAttention needs static, equal head counts and head sizes"
    if match.mask is not None and match.mask.shape is None:
        return "MultiHeadAttention needs the mask rank"
    return None


def _emit_ort_mha(match: AttentionMatch, graph: gs.Graph, names: NameSource) -> None:
    heads, head_dim, value_dim = (static_dim(match.query, 1), static_dim(match.query, 3),
                                  static_dim(match.value, 3))
    query = _to_bsd(match.query, IDENTITY_4D, heads * head_dim, names, graph)
    key = _to_bsd(match.key_source, match.key_perm, heads * head_dim, names, graph)
    value = _to_bsd(match.value, IDENTITY_4D, heads * value_dim, names, graph)
    inputs = [query, key, value]
    if match.mask is not None:
        bias = _attention_bias(match.mask, names, graph)
        inputs += [gs.Variable.empty(), gs.Variable.empty(), bias]  # no bias, no padding mask
    attrs = {"num_heads": heads, "scale": float(match.scale)}
    if match.causal:
        attrs["unidirectional"] = 1
    result = match.output_matmul.outputs[0]
    merged = _merged_heads_output(result, heads * value_dim, graph)
    if merged is not None:
        merged.inputs.clear()
        output = merged
    else:
        output = gs.Variable(names(f"{result.name}_bsd"), dtype=result.dtype)
    graph.layer(op="MultiHeadAttention", domain=MHA_DOMAIN, name=names(f"{match.name}_mha"),
                inputs=inputs, outputs=[output], attrs=attrs)
    if merged is None:
        match.output_matmul.outputs.clear()
        split = gs.Constant(names(f"{result.name}_bshd_shape"),
                            np.array([0, 0, heads, value_dim], dtype=np.int64))
        (bshd,) = graph.layer(op="Reshape", name=names(f"{result.name}_split_heads"),
                              inputs=[output, split], outputs=[names(f"{result.name}_bshd")])
        bshd.dtype = result.dtype
        graph.layer(op="Transpose", name=names(f"{result.name}_to_bhsd"), inputs=[bshd],
                    outputs=[result], attrs={"perm": list(TO_BSHD)})


def _count(matches, fused_names, predicate) -> AttentionCount:
    chosen = [m for m in matches if predicate(m)]
    return AttentionCount(found=len(chosen), fused=sum(1 for m in chosen if m.name in fused_names))


def fuse_attention(graph: gs.Graph, options: AttentionOptions | None = None) -> GraphResult:
    """Fuse every decomposed attention in `graph` (not modified) into the chosen target op."""
    options = options or AttentionOptions()
    opset = _target_opset(options)
    g = copy_graph(graph)
    if has_unknown_shapes(g):
        g = with_inferred_shapes(g)
    already_fused = count_fused_attention(g)
    matches, unmatched = find_attention(g)
    names, fused, skipped = NameSource(g), set(), list(unmatched)
    for match in matches:
        problem = _mha_shape_problem(match) if options.target is AttentionTarget.ORT_MHA else None
        if problem is not None:
            skipped.append(UnmatchedAttention(match.name, problem))
            continue
        emit = _emit_onnx_attention if options.target is AttentionTarget.ONNX else _emit_ort_mha
        emit(match, g, names)
        fused.add(match.name)
    if fused and options.target is AttentionTarget.ONNX:
        upgrade_opset_in_place(g, opset)
    g.cleanup().toposort()
    report = AttentionReport(
        target=options.target,
        self_attention=_count(matches, fused, lambda m: m.kind is AttentionKind.SELF),
        cross_attention=_count(matches, fused, lambda m: m.kind is AttentionKind.CROSS),
        causal=_count(matches, fused, lambda m: m.causal),
        already_fused=already_fused, not_fused=tuple(skipped))
    return GraphResult(g, report)


def run(model: onnx.ModelProto, options: PassOptions) -> PassResult:
    result = fuse_attention(gs.import_onnx(model), options.attention)
    return PassResult(model_from_graph(result.graph, model), result.report)
