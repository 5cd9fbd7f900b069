"""Fused attention on graphs torch's exporters write for a tiny two-head attention module."""
from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from pass_graphs import relative_l2, run_onnx

from sdcompile.models.attention import AttentionImpl, attention, merge_heads, split_heads
from sdcompile.passes import (AttentionOptions, AttentionTarget, IoDtype, PassOptions, Fp16Options,
                              optimize_model)
from sdcompile.passes.fused_attention import fuse_attention

WIDTH, HEADS, SEQ, CONTEXT_SEQ = 8, 2, 5, 7
FUSION_RTOL_L2 = 1e-5
# fp16 storage of activations and weights: ~2⁻¹¹ relative rounding per op through a few ops.
FP16_RTOL_L2 = 5e-3
EXPORTERS = {"dynamo-18": (True, 18), "torchscript-17": (False, 17)}
VARIANTS = {"self": {}, "causal": {"causal": True}, "cross": {"cross": True}}


class TinyAttention(torch.nn.Module):
    """LayerNorm → q/k/v projections → two-head attention → output projection."""

    def __init__(self, impl: AttentionImpl, causal: bool = False, cross: bool = False):
        super().__init__()
        self.impl, self.causal, self.cross = impl, causal, cross
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(WIDTH, WIDTH)
                                                        for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)                                   # (B, S, WIDTH)
        source = context if self.cross else h
        q, k, v = (split_heads(p(s), HEADS) for p, s in
                   ((self.to_q, h), (self.to_k, source), (self.to_v, source)))  # (B, heads, S, d)
        return self.to_out(merge_heads(attention(q, k, v, self.impl, self.causal)))


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, SEQ, WIDTH, generator=generator),
            torch.randn(batch, CONTEXT_SEQ, WIDTH, generator=generator))


@functools.lru_cache(maxsize=None)
def exported(exporter: str, variant: str, impl: AttentionImpl, dynamic: bool = False) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = TinyAttention(impl, **VARIANTS[variant]).eval()
    dynamo, opset = EXPORTERS[exporter]
    names = {"input_names": ["x", "context"], "output_names": ["y"]}
    if dynamic:
        axes = {"x": {0: "batch", 1: "seq"}, "context": {0: "batch"}, "y": {0: "batch", 1: "seq"}}
        names |= ({"dynamic_shapes": {"x": {0: "batch", 1: "seq"}, "context": {0: "batch"}}}
                  if dynamo else {"dynamic_axes": axes})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, _inputs(), None if dynamo else buffer, dynamo=dynamo,
                                    opset_version=opset, verbose=False, **names)
    return program.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())


def _feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    x, context = _inputs(batch)
    wanted = {i.name for i in model.graph.input}
    return {k: v.numpy() for k, v in {"x": x, "context": context}.items() if k in wanted}


@pytest.mark.parametrize("impl", [AttentionImpl.EXPLICIT, AttentionImpl.SDPA])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("target", list(AttentionTarget))
def test_exported_attention_is_fused_and_unchanged_numerically(exporter, variant, impl, target):
    model = exported(exporter, variant, impl)
    result = fuse_attention(gs.import_onnx(model), AttentionOptions(target=target))
    report = result.report
    kind = report.cross_attention if variant == "cross" else report.self_attention
    assert (kind.found, kind.fused) == (1, 1), report
    assert report.causal.fused == (1 if variant == "causal" else 0)
    fused = gs.export_onnx(result.graph)
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    feeds = _feeds(model)
    assert relative_l2(run_onnx(fused, feeds)[0], run_onnx(model, feeds)[0]) < FUSION_RTOL_L2


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_dynamic_shapes_sdpa_decomposition_is_fused(exporter):
    """Scale and causal mask computed from Shape ops at run time are still recognised."""
    model = exported(exporter, "causal", AttentionImpl.SDPA, dynamic=True)
    for target in AttentionTarget:
        result = fuse_attention(gs.import_onnx(model), AttentionOptions(target=target))
        assert result.report.causal.fused == 1, result.report
        fused = gs.export_onnx(result.graph)
        feeds = _feeds(model, batch=3)
        assert relative_l2(run_onnx(fused, feeds)[0], run_onnx(model, feeds)[0]) < FUSION_RTOL_L2


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_all_passes_end_to_end_against_torch(exporter):
    model = exported(exporter, "cross", AttentionImpl.EXPLICIT)
    options = PassOptions(fp16=Fp16Options(io_dtype=IoDtype.FP32))
    optimized, report = optimize_model(model, ["cleanup", "fuse-attention", "fp16"], options)
    assert report["fuse-attention"]["cross_attention"] == {"found": 1, "fused": 1}
    assert report["fp16"]["precision"]["fp32_outside_islands"] == []
    torch.manual_seed(0)
    module = TinyAttention(AttentionImpl.EXPLICIT, cross=True).eval()
    with torch.no_grad():
        expected = module(*_inputs()).numpy()
    assert relative_l2(run_onnx(optimized, _feeds(model))[0], expected) < FP16_RTOL_L2
