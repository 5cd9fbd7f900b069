"""Fused attention on hand-built graphs: structure, counts and ONNX Runtime numerics."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from pass_graphs import (BATCH, HEADS, SEQ, attention_feeds, attention_model, model_of,
                         relative_l2, run_onnx)

from sdcompile.graph.attention_match import AttentionKind, find_attention
from sdcompile.passes import AttentionOptions, AttentionTarget
from sdcompile.passes.fused_attention import AttentionCount, fuse_attention
from sdrun.errors import UserError

# Fusion only reorders float32 arithmetic inside one kernel.
FUSION_RTOL_L2 = 1e-5
MHA = AttentionOptions(target=AttentionTarget.ORT_MHA)


def _fused(model: onnx.ModelProto, options: AttentionOptions | None = None):
    result = fuse_attention(gs.import_onnx(model), options)
    return result, model_of(result.graph)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    feeds = attention_feeds(before)
    for expected, actual in zip(run_onnx(before, feeds), run_onnx(after, feeds)):
        assert relative_l2(actual, expected) < FUSION_RTOL_L2


def _attention_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    return node


def _attr(node: onnx.NodeProto, name: str):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else None


@pytest.mark.parametrize("scale_style", ["mul", "div", "sqrt_both"])
def test_two_head_self_attention_becomes_one_attention_node(scale_style):
    model = attention_model(scale_style=scale_style)
    result, fused = _fused(model)
    node = _attention_node(fused)
    assert "Softmax" not in _ops(fused) and _ops(fused).count("MatMul") == 3  # projections only
    assert _attr(node, "scale") == pytest.approx(0.5)  # 1/√4, however it was spelled
    assert _attr(node, "is_causal") is None and len(node.input) == 3
    assert result.report.self_attention.found == result.report.self_attention.fused == 1
    assert result.report.cross_attention.found == 0
    assert fused.opset_import[0].version == 23
    _assert_same_outputs(model, fused)


def test_key_comes_from_transpose_input_without_an_extra_transpose():
    _, fused = _fused(attention_model())
    node = _attention_node(fused)
    producers = {out: n for n in fused.graph.node for out in n.output}
    key_producer = producers[node.input[1]]
    assert key_producer.op_type == "Transpose" and list(_attr(key_producer, "perm")) == [0, 2, 1, 3]


def test_cross_attention_is_counted_as_cross():
    model = attention_model(cross=True)
    result, fused = _fused(model)
    assert result.report.cross_attention == AttentionCount(found=1, fused=1)
    assert result.report.self_attention.found == 0
    _assert_same_outputs(model, fused)


def test_causal_mask_constant_becomes_is_causal():
    model = attention_model(causal=True)
    result, fused = _fused(model)
    node = _attention_node(fused)
    assert _attr(node, "is_causal") == 1 and len(node.input) == 3
    assert result.report.causal.fused == 1 and "Add" not in _ops(fused)
    _assert_same_outputs(model, fused)


@pytest.mark.parametrize("mask", ["constant", "input"])
def test_other_additive_masks_are_passed_as_attn_mask(mask):
    model = attention_model(mask=mask)
    result, fused = _fused(model)
    node = _attention_node(fused)
    assert len(node.input) == 4 and _attr(node, "is_causal") is None
    assert result.report.causal.found == 0
    _assert_same_outputs(model, fused)


def test_graph_with_attention_passes_unchanged():
    _, fused = _fused(attention_model())
    again, refused = _fused(fused)
    assert again.report.already_fused == 1 and again.report.found == 0
    assert _ops(refused) == _ops(fused)


def test_input_graph_is_not_modified():
    graph = gs.import_onnx(attention_model(causal=True))
    before = [(n.op, [t.name for t in n.inputs]) for n in graph.nodes]
    fuse_attention(graph)
    assert [(n.op, [t.name for t in n.inputs]) for n in graph.nodes] == before
    assert graph.opset == 18


def test_target_opset_below_23_is_refused():
    with pytest.raises(UserError) as error:
        fuse_attention(gs.import_onnx(attention_model()), AttentionOptions(opset=21))
    assert "23" in error.value.expected and error.value.fix


def test_higher_target_opset_is_used():
    _, fused = _fused(attention_model(), AttentionOptions(opset=24))
    assert fused.opset_import[0].version == 24


def test_probabilities_used_elsewhere_are_reported_not_fused():
    model = attention_model()
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    result, fused = _fused(model)
    assert result.report.fused == 0 and len(result.report.not_fused) == 1
    assert "Softmax" in _ops(fused)


def test_opset_17_reduce_axes_move_to_an_input_when_raised_to_23():
    model = attention_model(opset=17)
    model.graph.node.append(helper.make_node("ReduceMean", ["y"], ["y_mean"], axes=[-1]))
    model.graph.output.append(helper.make_tensor_value_info("y_mean", TensorProto.FLOAT, None))
    _, fused = _fused(model)
    (reduce,) = [n for n in fused.graph.node if n.op_type == "ReduceMean"]
    assert len(reduce.input) == 2 and _attr(reduce, "axes") is None
    onnx.checker.check_model(fused, full_check=True)
    _assert_same_outputs(model, fused)


@pytest.mark.parametrize("variant", [{}, {"cross": True}, {"causal": True}, {"mask": "constant"},
                                     {"scale_style": "sqrt_both"}])
def test_multi_head_attention_target_matches_on_onnxruntime_cpu(variant):
    model = attention_model(**variant)
    result, fused = _fused(model, MHA)
    node = _attention_node(fused)
    assert node.domain == "com.microsoft" and _attr(node, "num_heads") == HEADS
    assert _attr(node, "unidirectional") == (1 if variant.get("causal") else None)
    assert result.report.fused == 1
    assert {(o.domain, o.version) for o in fused.opset_import} >= {("com.microsoft", 1)}
    assert fused.opset_import[0].version == 18  # the contrib op needs no newer opset
    _assert_same_outputs(model, fused)


def test_multi_head_attention_reads_projections_directly():
    _, fused = _fused(attention_model(), MHA)
    node = _attention_node(fused)
    producers = {out: n.op_type for n in fused.graph.node for out in n.output}
    assert [producers[name] for name in node.input[:3]] == ["MatMul"] * 3
    assert fused.graph.output[0].name == node.output[0]  # no re-split of heads


def test_self_and_cross_come_from_the_projection_sources():
    graph = gs.import_onnx(attention_model(cross=True))
    (match,), _ = find_attention(graph)
    assert match.kind is AttentionKind.CROSS and match.scale == pytest.approx(0.5)
    graph = gs.import_onnx(attention_model())
    (match,), _ = find_attention(graph)
    assert match.kind is AttentionKind.SELF


def test_feeds_cover_a_batch_of_full_sequences():
    feeds = attention_feeds(attention_model(cross=True))
    assert feeds["x"].shape[:2] == (BATCH, SEQ)
    assert np.isfinite(feeds["context"]).all()
