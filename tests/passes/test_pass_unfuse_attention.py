"""Unfused attention: hand-built graphs, then every component of the session's tiny bundles, on
ONNX Runtime CPU against the fused graph they came from."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from pass_graphs import (BATCH, HEADS, SEQ, WIDTH, attention_feeds, attention_model, model_of,
                         relative_l2, run_onnx)

from benchmarks.gpu_check import sample_feeds
from sdcompile.graph.attention_match import FUSED_ATTENTION_OPS, count_fused_attention
from sdcompile.graph.shape_inference import check_model_types
from sdcompile.inspection.fp16_audit import audit_precision
from sdcompile.passes import AttentionTarget, optimize_model
from sdcompile.passes.unfused_attention import UnfuseCount, unfuse_attention
from sdrun.bundle import read_manifest

# fp32: the decomposition is the arithmetic the fused kernel does, in the same order once ONNX
# Runtime folds Mul(scale) into the MatMul (measured: 0 on every tiny component; 7e-7 on the
# UNet with graph optimizations off).
FP32_RTOL_L2 = 1e-6
# fp16: the decomposition rounds the scores, the probabilities and the result to fp16 (2⁻¹¹ ≈
# 4.9e-4 relative each), which ONNX Runtime's fused kernel keeps in fp32; the tiny UNet's 14
# attentions measured 9.2e-4, text encoder 3.1e-4, VAE 4e-5..1.7e-4. 5e-3 is ten such roundings.
FP16_RTOL_L2 = 5e-3
VARIANTS = [{}, {"cross": True}, {"causal": True}, {"mask": "constant"}, {"mask": "input"},
            {"scale_style": "sqrt_both"}]
FP32, FP16, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BOOL


def _fused_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if (n.domain, n.op_type) in FUSED_ATTENTION_OPS]


def _unfused(model: onnx.ModelProto):
    result = unfuse_attention(gs.import_onnx(model))
    return result.report, model_of(result.graph)


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _attr(node: onnx.NodeProto, name: str):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else None


def _assert_close(actual_model, expected_model, feeds, limit):
    for actual, expected in zip(run_onnx(actual_model, feeds), run_onnx(expected_model, feeds)):
        error = relative_l2(actual, expected)
        assert error <= limit, f"relative L2 {error:.3g} > {limit}"


@pytest.mark.parametrize("target", list(AttentionTarget))
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_attention_unfuses_to_the_same_numbers_and_fuses_again(variant, target):
    fused, _ = optimize_model(attention_model(**variant), ["fuse-attention"], attention_target=target)
    report, unfused = _unfused(fused)
    assert not _fused_ops(unfused) and report.unfused == 1 and not report.not_unfused
    kind = report.cross_attention if variant.get("cross") else report.self_attention
    assert kind == UnfuseCount(found=1, unfused=1)
    assert report.causal.unfused == (1 if variant.get("causal") else 0)
    check_model_types(unfused)
    _assert_close(unfused, fused, attention_feeds(fused), FP32_RTOL_L2)
    again, _ = optimize_model(unfused, ["fuse-attention"], attention_target=target)
    assert len(_fused_ops(again)) == 1


def test_decomposition_is_the_pattern_tensorrt_fuses():
    fused, _ = optimize_model(attention_model(causal=True), ["fuse-attention"])
    _, unfused = _unfused(fused)
    (softmax,) = [n for n in unfused.graph.node if n.op_type == "Softmax"]
    assert _attr(softmax, "axis") == -1
    causal_add = _producer(unfused, softmax.input[0])
    scores = _producer(unfused, causal_add.input[0])
    scaled_query, key_t = (_producer(unfused, name) for name in scores.input)
    assert (causal_add.op_type, scores.op_type, scaled_query.op_type) == ("Add", "MatMul", "Mul")
    # The fused node read K through a Transpose; Kᵀ is one Transpose of the projection, not two.
    assert key_t.op_type == "Transpose" and _producer(unfused, key_t.input[0]).op_type == "Reshape"
    mask = next(i for i in unfused.graph.initializer if i.name == causal_add.input[1])
    values = onnx.numpy_helper.to_array(mask)
    assert values.shape == (SEQ, SEQ) and np.all(np.isneginf(values) == np.triu(np.ones((SEQ, SEQ)), 1))


def test_causal_mask_over_a_dynamic_sequence_is_built_at_run_time():
    fused, _ = optimize_model(attention_model(causal=True), ["fuse-attention"])
    for graph_input in (*fused.graph.input, *fused.graph.output):
        graph_input.type.tensor_type.shape.dim[1].dim_param = "seq"
    del fused.graph.value_info[:]
    report, unfused = _unfused(fused)
    assert report.causal == UnfuseCount(found=1, unfused=1)
    assert "Trilu" in [n.op_type for n in unfused.graph.node]
    for seq in (3, SEQ + 5):
        feeds = {"x": np.random.default_rng(seq).standard_normal((BATCH, seq, WIDTH)).astype(np.float32)}
        _assert_close(unfused, fused, feeds, FP32_RTOL_L2)
    again, _ = optimize_model(unfused, ["fuse-attention"])
    assert len(_fused_ops(again)) == 1


def _attention_graph(*, q_heads=HEADS, kv_heads=HEADS, mask: int | None = None, dtype=FP32,
                     **attrs) -> onnx.ModelProto:
    """Q (B, S, q_heads·4), K and V (B, S, kv_heads·4) [, mask (S, S)] -> one 3-D Attention node."""
    head = 4
    inputs = [helper.make_tensor_value_info("q", dtype, [BATCH, SEQ, q_heads * head]),
              helper.make_tensor_value_info("k", dtype, [BATCH, SEQ, kv_heads * head]),
              helper.make_tensor_value_info("v", dtype, [BATCH, SEQ, kv_heads * head])]
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask, [SEQ, SEQ]))
    node = helper.make_node("Attention", [i.name for i in inputs], ["y"], q_num_heads=q_heads,
                            kv_num_heads=kv_heads, **attrs)
    graph = helper.make_graph([node], "attention3d", inputs,
                              [helper.make_tensor_value_info("y", dtype, [BATCH, SEQ, q_heads * head])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _feeds_3d(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng, feeds = np.random.default_rng(0), {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        elem = value.type.tensor_type.elem_type
        feeds[value.name] = (rng.random(shape) > 0.3 if elem == BOOL else
                             rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(elem)))
    if "mask" in feeds and feeds["mask"].dtype == bool:
        feeds["mask"][:, 0] = True  # every query keeps a key: Attention-23 zeroes fully masked rows
    return feeds


@pytest.mark.parametrize("case", [
    {},                                  # default scale 1/√d from 3-D inputs
    {"kv_heads": 1, "scale": 0.3},       # multi-query: one key/value head broadcast
    {"mask": FP32, "is_causal": 1},      # additive mask composed with causal
    {"mask": BOOL},                      # boolean mask becomes Where
])
def test_3d_attention_with_head_counts_matches_onnxruntime(case):
    model = _attention_graph(**{k: v for k, v in case.items() if k in ("kv_heads", "mask")},
                             **{k: v for k, v in case.items() if k in ("scale", "is_causal")})
    report, unfused = _unfused(model)
    assert report.unfused == 1 and not _fused_ops(unfused)
    check_model_types(unfused)
    _assert_close(unfused, model, _feeds_3d(model), FP32_RTOL_L2)


def test_softmax_precision_is_kept_around_the_softmax():
    report, unfused = _unfused(_attention_graph(dtype=FP16, softmax_precision=FP32))
    (softmax,) = [n for n in unfused.graph.node if n.op_type == "Softmax"]
    cast_in, consumer = _producer(unfused, softmax.input[0]), next(
        n for n in unfused.graph.node if softmax.output[0] in n.input)
    assert report.unfused == 1
    assert (cast_in.op_type, _attr(cast_in, "to"), consumer.op_type, _attr(consumer, "to")) == (
        "Cast", FP32, "Cast", FP16)


@pytest.mark.parametrize("case, reason", [
    ({"q_heads": 4, "kv_heads": 2}, "grouped-query"),
    ({"softcap": 30.0}, "softcap"),
])
def test_what_cannot_be_decomposed_stays_fused_with_the_reason(case, reason):
    model = _attention_graph(**case)
    report, unfused = _unfused(model)
    assert report.unfused == 0 and _fused_ops(unfused) == ["Attention"]
    (skipped,) = report.not_unfused
    assert reason in skipped.reason


def test_past_key_and_value_stay_fused():
    model = _attention_graph()
    node = model.graph.node[0]
    node.input.extend(["", "past_key", "past_value"])
    node.output.extend(["present_key", "present_value"])
    past = [BATCH, HEADS, 2, 4]
    model.graph.input.extend([helper.make_tensor_value_info(n, FP32, past) for n in ("past_key", "past_value")])
    model.graph.output.append(helper.make_tensor_value_info("present_key", FP32, None))
    report, _ = _unfused(model)
    assert report.unfused == 0 and "past" in report.not_unfused[0].reason


def test_input_graph_is_not_modified():
    fused, _ = optimize_model(attention_model(causal=True), ["fuse-attention"])
    graph = gs.import_onnx(fused)
    before = [(n.op, [t.name for t in n.inputs]) for n in graph.nodes]
    unfuse_attention(graph)
    assert [(n.op, [t.name for t in n.inputs]) for n in graph.nodes] == before


# ---------------------------------------------------------------------------------------------
# The tiny bundles: every component, fp32 (exporter-written Attention) and fp16 (fused by us)


@pytest.mark.parametrize("bundle_fixture, limit", [("tiny_bundle", FP32_RTOL_L2),
                                                   ("tiny_bundle_fp16", FP16_RTOL_L2)])
def test_every_bundle_component_unfuses_to_the_same_outputs(request, bundle_fixture, limit):
    bundle = request.getfixturevalue(bundle_fixture)
    manifest = read_manifest(bundle)
    for name, record in manifest.components.items():
        model = onnx.load(str(bundle / record.graph))
        unfused, reports = optimize_model(model, ["unfuse-attention"])  # checks the model's types
        report = reports["unfuse-attention"]
        fused_before = count_fused_attention(gs.import_onnx(model))
        assert not _fused_ops(unfused) and report["not_unfused"] == [], name
        assert report["self_attention"]["unfused"] + report["cross_attention"]["unfused"] == fused_before
        if name == "text_encoder":
            assert report["causal"]["unfused"] == fused_before > 0
        shapes = {n: levels["opt"] for n, levels in record.profile.items()}
        feeds = sample_feeds(record, shapes, manifest.recipe.text_encoder.vocab_size, np.random.default_rng(0))
        for actual, expected in zip(run_onnx(unfused, feeds), run_onnx(model, feeds)):
            error = relative_l2(actual, expected)
            assert error <= limit, f"{name}: relative L2 {error:.3g} > {limit}"
        _, refused = optimize_model(unfused, ["fuse-attention"])
        assert refused["fuse-attention"]["self_attention"]["fused"] + \
            refused["fuse-attention"]["cross_attention"]["fused"] == fused_before, name


def test_fp16_bundle_stays_fp16_with_softmax_outside_the_islands(tiny_bundle_fp16):
    manifest = read_manifest(tiny_bundle_fp16)
    for name, record in manifest.components.items():
        model = onnx.load(str(tiny_bundle_fp16 / record.graph))
        unfused, _ = optimize_model(model, ["unfuse-attention"])
        before, after = audit_precision(gs.import_onnx(model)), audit_precision(gs.import_onnx(unfused))
        # unet_step: the step-fusion wrapper's fp32 update, in both
        assert sorted(after.fp32_outside_islands) == sorted(before.fp32_outside_islands), name
        types = {v.name: v.type.tensor_type.elem_type
                 for v in onnx.shape_inference.infer_shapes(unfused).graph.value_info}
        assert {types[n.output[0]] for n in unfused.graph.node if n.op_type == "Softmax"} == {FP16}, name
