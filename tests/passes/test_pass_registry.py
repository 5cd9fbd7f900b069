"""The pass registry and its one contract, `optimize_model` and `graph_summary`."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import helper
from pass_graphs import (BATCH, SEQ, WIDTH, attention_feeds, attention_model, relative_l2, run_onnx,
                         toy_unet)

from sdcompile.graph.reports import plain_data
from sdcompile.inspection.summary import graph_summary
from sdcompile.options import Precision
from sdcompile.passes import (PASSES, AttentionOptions, AttentionTarget, Fp16Options, IoDtype,
                              PassOptions, PassResult, default_passes, optimize_model)
from sdrun.errors import UserError

FP16_RTOL_L2 = 5e-3


def test_registry_names_the_passes():
    assert list(PASSES) == ["cleanup", "fuse-attention", "unfuse-attention", "fp16", "step-fusion"]
    assert default_passes(Precision.FP32) == ["cleanup", "fuse-attention"]
    assert default_passes(Precision.FP16) == ["cleanup", "fuse-attention", "fp16"]


def _input_for(name: str) -> onnx.ModelProto:
    model = toy_unet() if name == "step-fusion" else attention_model(causal=True)
    if name == "unfuse-attention":
        model, _ = optimize_model(model, ["fuse-attention"])
    model.doc_string = "made by the test"
    helper.set_model_props(model, {"origin": "test"})
    return model


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_returns_a_new_model_and_a_frozen_report(name):
    model = _input_for(name)
    before = model.SerializeToString()
    result = PASSES[name](model, PassOptions())
    assert isinstance(result, PassResult) and isinstance(result.model, onnx.ModelProto)
    assert model.SerializeToString() == before
    assert dataclasses.is_dataclass(result.report) and type(result.report).__dataclass_params__.frozen
    json.dumps(plain_data(result.report))
    assert result.model.doc_string == "made by the test"
    assert {p.key: p.value for p in result.model.metadata_props} == {"origin": "test"}
    onnx.checker.check_model(result.model, full_check=True)


def test_optimize_model_runs_passes_in_order_and_reports_each():
    model = attention_model(causal=True)
    optimized, report = optimize_model(model, ["cleanup", "fuse-attention", "fp16"])
    assert list(report) == ["cleanup", "fuse-attention", "fp16"]
    assert report["cleanup"]["nodes_after"] <= report["cleanup"]["nodes_before"]
    assert report["fuse-attention"]["causal"] == {"found": 1, "fused": 1}
    assert report["fp16"]["io_dtype"] == "fp32"
    assert report["fp16"]["precision"]["fp32_outside_islands"] == []
    json.dumps(report)
    ops = [n.op_type for n in optimized.graph.node]
    assert "Attention" in ops and "Softmax" not in ops
    feeds = attention_feeds(model)
    assert relative_l2(run_onnx(optimized, feeds)[0], run_onnx(model, feeds)[0]) < FP16_RTOL_L2


def test_optimize_model_passes_options_through():
    options = PassOptions(attention=AttentionOptions(target=AttentionTarget.ORT_MHA),
                          fp16=Fp16Options(io_dtype=IoDtype.FP16))
    optimized, _ = optimize_model(attention_model(cross=True), ["fuse-attention", "fp16"], options)
    assert any(n.op_type == "MultiHeadAttention" for n in optimized.graph.node)
    assert optimized.graph.input[0].type.tensor_type.elem_type == 10  # FLOAT16


def test_attention_target_shorthand_overrides_the_options():
    optimized, report = optimize_model(attention_model(), ["fuse-attention"],
                                       attention_target=AttentionTarget.ORT_MHA)
    assert report["fuse-attention"]["target"] == "ort-mha"
    assert any(n.op_type == "MultiHeadAttention" for n in optimized.graph.node)


def test_unknown_pass_name_is_a_user_error():
    with pytest.raises(UserError) as error:
        optimize_model(attention_model(), ["cleanup", "fuse-everything"])
    assert "fuse-everything" in error.value.problem and "fuse-attention" in error.value.expected


def test_summary_before_and_after_optimisation():
    model = attention_model(cross=True)
    before = graph_summary(model)
    assert before["attention"] == {"fused": 0, "unfused": 1, "unfused_self": 0,
                                   "unfused_cross": 1, "unfused_causal": 0, "unrecognised": []}
    assert before["ops"]["Softmax"] == 1 and before["opsets"] == {"ai.onnx": 18}
    assert before["inputs"][0] == {"name": "x", "dtype": "float", "shape": [BATCH, SEQ, WIDTH]}
    assert before["precision"]["fp16_nodes"] == 0 and before["precision"]["fp32_outside_islands"]
    after = graph_summary(optimize_model(model, ["fuse-attention", "fp16"])[0])
    assert after["attention"]["fused"] == 1 and after["attention"]["unfused"] == 0
    assert after["precision"]["fp32_outside_islands"] == [] and after["precision"]["fp16_nodes"] > 0
    assert after["outputs"][0]["dtype"] == "float" and after["opsets"]["ai.onnx"] == 23
    assert after["weight_bytes"] == pytest.approx(before["weight_bytes"] / 2, rel=0.1)


def test_summary_is_plain_data():
    summary = graph_summary(attention_model())
    assert isinstance(summary["nodes"], int) and isinstance(summary["ops"], dict)
    assert np.all([isinstance(k, str) for k in summary])
