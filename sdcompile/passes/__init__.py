"""Graph passes over ONNX models, each a pure function of an onnx-graphsurgeon graph.

`PASSES` maps the names the CLI accepts to the passes; `optimize_model` runs a list of them in
order on a ModelProto and returns the new model with each pass's report as plain data.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import onnx
import onnx_graphsurgeon as gs

from sdcompile.options import AttentionTarget, Precision
from sdcompile.passes.cleanup import CleanupOptions, CleanupReport, cleanup
from sdcompile.passes.fp16 import Fp16Report, Fp16Result, cast_to_fp16
from sdcompile.passes.fp16_audit import PrecisionAudit, audit_precision
from sdcompile.passes.fp16_policy import DEFAULT_FP32_OP_TYPES, Fp16Options, IoDtype
from sdcompile.passes.fused_attention import (AttentionOptions, AttentionReport, AttentionResult,
                                              fuse_attention)
from sdcompile.passes.reports import plain_data
from sdcompile.passes.shape_inference import check_model_types, infer_shapes
from sdcompile.passes.step_fusion import step_fused_unet, wrapper_node_names
from sdcompile.passes.summary import graph_summary
from sdrun.errors import UserError


@dataclass(frozen=True)
class PassOptions:
    """Per-pass options; None means that pass's defaults."""
    cleanup: CleanupOptions | None = None
    attention: AttentionOptions | None = None
    fp16: Fp16Options | None = None


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    report: object  # the pass's report dataclass


def _run_cleanup(graph: gs.Graph, options: PassOptions) -> PassResult:
    cleaned = cleanup(graph, options.cleanup)
    return PassResult(cleaned, CleanupReport(nodes_before=len(graph.nodes),
                                             nodes_after=len(cleaned.nodes)))


def _run_fuse_attention(graph: gs.Graph, options: PassOptions) -> PassResult:
    result = fuse_attention(graph, options.attention)
    return PassResult(result.graph, result.report)


def _run_fp16(graph: gs.Graph, options: PassOptions) -> PassResult:
    result = cast_to_fp16(graph, options.fp16)
    return PassResult(result.graph, result.report)


def _run_step_fusion(graph: gs.Graph, options: PassOptions) -> PassResult:
    fused = step_fused_unet(gs.export_onnx(graph))
    return PassResult(gs.import_onnx(fused), {"fp32_node_names": wrapper_node_names(fused)})


PASSES: dict[str, Callable[[gs.Graph, PassOptions], PassResult]] = {
    "cleanup": _run_cleanup,
    "fuse-attention": _run_fuse_attention,
    "fp16": _run_fp16,
    "step-fusion": _run_step_fusion,
}


def default_passes(precision: Precision) -> list[str]:
    """The pass list an export at `precision` runs."""
    passes = ["cleanup", "fuse-attention"]
    return passes + ["fp16"] if precision is Precision.FP16 else passes


def _check_names(passes: Sequence[str]) -> None:
    unknown = [name for name in passes if name not in PASSES]
    if unknown:
        raise UserError(f"Unknown graph pass: {', '.join(unknown)}.",
                        expected=f"one or more of: {', '.join(PASSES)}",
                        got=", ".join(passes), fix="choose pass names from the expected list")


def _model_from_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    model.doc_string = like.doc_string
    model.metadata_props.extend(like.metadata_props)
    return model


def _with_target(options: PassOptions, target: AttentionTarget | None) -> PassOptions:
    if target is None:
        return options
    return replace(options, attention=replace(options.attention or AttentionOptions(), target=target))


def optimize_model(model: onnx.ModelProto, passes: Sequence[str],
                   options: PassOptions | None = None, *,
                   attention_target: AttentionTarget | None = None) -> tuple[onnx.ModelProto, dict]:
    """Run `passes` (names from PASSES) in order on `model` (not modified).

    `attention_target` is shorthand for `options.attention.target`. Returns the optimized model,
    which passes `onnx.checker.check_model(full_check=True)`, and {pass name: its report as
    plain data}.
    """
    _check_names(passes)
    options = _with_target(options or PassOptions(), attention_target)
    graph, reports = gs.import_onnx(model), {}
    for name in passes:
        start = time.perf_counter()
        result = PASSES[name](graph, options)
        graph = result.graph
        reports[name] = {**plain_data(result.report), "seconds": round(time.perf_counter() - start, 2)}
    optimized = _model_from_graph(graph, model)
    check_model_types(optimized)
    return optimized, reports


__all__ = [
    "PASSES", "PassOptions", "PassResult", "default_passes", "optimize_model", "graph_summary",
    "cleanup", "CleanupOptions", "CleanupReport",
    "fuse_attention", "AttentionOptions", "AttentionTarget", "AttentionReport", "AttentionResult",
    "cast_to_fp16", "Fp16Options", "IoDtype", "Fp16Report", "Fp16Result", "DEFAULT_FP32_OP_TYPES",
    "audit_precision", "PrecisionAudit", "check_model_types", "infer_shapes", "plain_data",
]
