"""A plain-data summary of an ONNX model for `sdcompile inspect`."""
from __future__ import annotations

from collections import Counter

import onnx
import onnx_graphsurgeon as gs

from sdcompile.graph.attention_match import AttentionKind, count_fused_attention, find_attention
from sdcompile.graph.dtypes import dtype_name, onnx_dtype
from sdcompile.graph.fp16_policy import Fp16Options
from sdcompile.graph.reports import plain_data
from sdcompile.graph.shape_inference import has_unknown_shapes, weight_bytes, with_inferred_shapes
from sdcompile.inspection.fp16_audit import audit_precision


def _io(tensors) -> list[dict]:
    return [{"name": t.name, "dtype": dtype_name(onnx_dtype(t.dtype)),
             "shape": None if t.shape is None else list(t.shape)} for t in tensors]


def _op_histogram(graph: gs.Graph) -> dict[str, int]:
    counts = Counter(n.op if (n.domain or "") in ("", "ai.onnx") else f"{n.domain}.{n.op}"
                     for n in graph.nodes)
    return dict(sorted(counts.items()))


def _attention(graph: gs.Graph) -> dict:
    matches, unmatched = find_attention(graph)
    return {
        "fused": count_fused_attention(graph),
        "unfused": len(matches),
        "unfused_self": sum(1 for m in matches if m.kind is AttentionKind.SELF),
        "unfused_cross": sum(1 for m in matches if m.kind is AttentionKind.CROSS),
        "unfused_causal": sum(1 for m in matches if m.causal),
        "unrecognised": [{"node": u.name, "reason": u.reason} for u in unmatched],
    }


def graph_summary(model: onnx.ModelProto, fp16_options: Fp16Options | None = None) -> dict:
    """Op histogram, attention fused/unfused counts, fp16/fp32 compute-node counts (with the
    fp32 nodes outside the islands of `fp16_options`), I/O names with dtypes and dims."""
    graph = gs.import_onnx(model)
    if has_unknown_shapes(graph):
        graph = with_inferred_shapes(graph)
    audit = audit_precision(graph, fp16_options)
    return {
        "opsets": {d.domain or "ai.onnx": d.version for d in model.opset_import},
        "nodes": len(graph.nodes),
        "ops": _op_histogram(graph),
        "inputs": _io(graph.inputs),
        "outputs": _io(graph.outputs),
        "weight_bytes": weight_bytes(model),
        "attention": _attention(graph),
        "precision": {
            "fp16_nodes": audit.fp16_nodes,
            "fp32_nodes": audit.fp32_nodes,
            "fp32_island_nodes": len(audit.fp32_island_nodes),
            "fp32_outside_islands": list(audit.fp32_outside_islands),
            "range_verdict": audit.range_verdict.value,
            "ranges": plain_data(audit.ranges),
        },
    }
