"""`sdcompile debug precision`: a hand-built decomposed group norm whose variance fp16 cannot hold is named
as the first offender, and casting again with the islands it prints gives a graph that passes the fp16 gate;
on a real fp16 bundle the command runs through the CLI and finds nothing past the threshold."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from sdcompile.debug_precision import debug_precision, fp32_twin
from sdcompile.graph.fp16_policy import Fp16Options
from sdcompile.graph.fp16_ranges import exposed_values
from sdcompile.graph.partition import plan_parts
from sdcompile.passes.fp16 import cast_to_fp16
from sdrun.gates import check_output
from tests.passes.pass_graphs import run_onnx

CHANNELS, GROUPS, SIDE = 4, 2, 8
NO_ISLANDS = Fp16Options(keep_fp32_op_types=frozenset(), keep_fp32_upstream_of=frozenset())
# Inputs ~N(0, 400²): the conv's outputs stay in fp16's range, their squares (1.6e5) do not.
INPUT_SCALE = 400.0


def decomposed_group_norm_model() -> onnx.ModelProto:
    """x (1, C, S, S) -> Conv 1x1 -> group norm as torch's exporters decompose it (mean, x − mean, Pow 2,
    mean, + eps, Sqrt, Div) -> (1, C, S, S)."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor("w", TensorProto.FLOAT, (CHANNELS, CHANNELS, 1, 1),
                                  (np.eye(CHANNELS) + 0.1 * rng.standard_normal((CHANNELS, CHANNELS))).ravel()),
               helper.make_tensor("grouped", TensorProto.INT64, (3,), [1, GROUPS, -1]),
               helper.make_tensor("back", TensorProto.INT64, (4,), [1, CHANNELS, SIDE, SIDE]),
               helper.make_tensor("axes", TensorProto.INT64, (1,), [2]),
               helper.make_tensor("two", TensorProto.FLOAT, (), [2.0]),
               helper.make_tensor("eps", TensorProto.FLOAT, (), [1e-5])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
             helper.make_node("Reshape", ["conv", "grouped"], ["g"], name="group"),
             helper.make_node("ReduceMean", ["g", "axes"], ["mean"], name="mean"),
             helper.make_node("Sub", ["g", "mean"], ["centered"], name="center"),
             helper.make_node("Pow", ["centered", "two"], ["squared"], name="square"),
             helper.make_node("ReduceMean", ["squared", "axes"], ["variance"], name="variance"),
             helper.make_node("Add", ["variance", "eps"], ["shifted"], name="add_eps"),
             helper.make_node("Sqrt", ["shifted"], ["std"], name="std"),
             helper.make_node("Div", ["centered", "std"], ["normed"], name="normalize"),
             helper.make_node("Reshape", ["normed", "back"], ["y"], name="ungroup")]
    shape = (1, CHANNELS, SIDE, SIDE)
    graph = helper.make_graph(nodes, "group-norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def fp16_model(model: onnx.ModelProto, options: Fp16Options) -> onnx.ModelProto:
    return gs.export_onnx(cast_to_fp16(gs.import_onnx(model), options).graph)


def run_as_declared(model: onnx.ModelProto, feeds: dict, path) -> np.ndarray:
    """The output with every value held in the type the graph declares, as TensorRT's strongly typed networks
    hold them: one node per session, so ONNX Runtime's CPU provider cannot keep the fp16 values of the kernels
    it upcasts in fp32 between them (which hides fp16 overflow from a whole-graph session)."""
    values = {}
    for exposed in exposed_values(path, model, plan_parts(model.graph, 2**40, max_nodes=1), feeds):
        values.update(exposed)
    return values["y"]


def test_the_variance_is_named_and_its_islands_pass_the_gate(tmp_path):
    model = decomposed_group_norm_model()
    feeds = {"x": INPUT_SCALE * np.random.default_rng(1).standard_normal((1, CHANNELS, SIDE, SIDE), dtype=np.float32)}
    reference = run_onnx(model, feeds)[0]

    report = debug_precision(fp16_model(model, NO_ISLANDS), "group-norm", feeds)
    assert report.offenders == ("square",)
    assert set(report.islands) == {"square", "variance", "add_eps", "std"}
    square = next(e for e in report.nodes if e.node == "square")
    assert square.nonfinite > 0 and square.fp16_range > 1
    cast = run_as_declared(fp16_model(model, NO_ISLANDS), feeds, tmp_path / "a.onnx")
    assert not check_output("group-norm", "y", reference, cast, "fp16").passed

    islands = Fp16Options(keep_fp32_op_types=frozenset(), keep_fp32_node_names=frozenset(report.islands),
                          keep_fp32_upstream_of=frozenset())
    fixed = fp16_model(model, islands)
    assert debug_precision(fixed, "group-norm", feeds).offenders == ()
    assert check_output("group-norm", "y", reference, run_as_declared(fixed, feeds, tmp_path / "b.onnx"), "fp16").passed


def test_the_fp32_twin_declares_no_fp16_and_keeps_every_name():
    half = fp16_model(decomposed_group_norm_model(), NO_ISLANDS)
    twin = fp32_twin(half)
    assert [n.name for n in twin.graph.node] == [n.name for n in half.graph.node]
    assert all(t.data_type != TensorProto.FLOAT16 for t in twin.graph.initializer)
    assert all(a.i != TensorProto.FLOAT16 for n in twin.graph.node if n.op_type == "Cast" for a in n.attribute)


def test_an_fp32_component_is_refused_with_exit_code_2(tiny_bundle, capsys):
    from sdcompile.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["debug", "precision", str(tiny_bundle), "--component", "vae_decoder"])
    assert exited.value.code == 2 and "no fp16 weights" in capsys.readouterr().err


@pytest.mark.slow  # one ONNX Runtime session per node of both graphs: ~10 s on 2 cores
def test_the_cli_reports_an_fp16_bundle(tiny_bundle_fp16, tmp_path):
    from click.testing import CliRunner

    from sdcompile.cli import cli

    out = tmp_path / "precision.json"
    result = CliRunner().invoke(cli, ["debug", "precision", str(tiny_bundle_fp16), "--component", "vae_decoder",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "no node is past the threshold" in result.output
    report = json.loads(out.read_text())
    assert report["offenders"] == [] and len(report["nodes"]) > 50
