"""The range finder on the tiny recipe's VAE decoder: ordinary random weights keep nothing; one conv
scaled until the residual stream passes the fp16 range breaks a plain fp16 cast and not a ranged one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from sdcompile.graph.fp16_policy import Fp16Options, RangeIslands
from sdcompile.graph.reports import plain_data
from sdcompile.graph.fp16_ranges import RANGE_THRESHOLD, observed_max_abs, range_islands
from sdcompile.inspection.fp16_audit import RangeVerdict, describe_ranges
from sdcompile.passes import optimize_on_disk
from sdcompile.passes.fp16 import cast_to_fp16
from sdrun.gates import check_output

# The last res block's conv2 × this: its output (max |x| ~4 on random weights) reaches ~1e5, past
# fp16's 65504, and so does the residual sum after it; norm_out brings the image back to scale.
OVERFLOW_SCALE = 30000.0


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> onnx.ModelProto:
    """The tiny recipe's fp32 VAE decoder as exported (cleanup and attention fusion done)."""
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    out = tmp_path_factory.mktemp("ranges") / "bundle"
    export_bundle(ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=out,
                               components=("vae_decoder",), verify=False), log=lambda line: None)
    return onnx.load(str(out / "vae_decoder" / "model.onnx"))


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}


def _scaled(model: onnx.ModelProto, conv: onnx.NodeProto, scale: float) -> onnx.ModelProto:
    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    for tensor in scaled.graph.initializer:
        if tensor.name in conv.input[1:]:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), tensor.name))
    return scaled


def _last_residual_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    """The Conv feeding the decoder's last residual Add (the last res block's conv2)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    last_add = [n for n in model.graph.node if n.op_type == "Add"][-1]
    return next(producers[i] for i in last_add.input if i in producers and producers[i].op_type == "Conv")


def _run(model: onnx.ModelProto, feeds) -> np.ndarray:
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _save(model: onnx.ModelProto, tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _ranges(model, feeds, tmp_path):
    return range_islands(model.graph, observed_max_abs(_save(model, tmp_path), feeds))


def test_ordinary_weights_keep_nothing_and_change_nothing(decoder, feeds, tmp_path):
    ranges = _ranges(decoder, feeds, tmp_path)
    assert ranges.kept == () and not ranges.whole_graph and ranges.heavy_total > 0
    plain = cast_to_fp16(gs.import_onnx(decoder))
    ranged = cast_to_fp16(gs.import_onnx(decoder), Fp16Options(ranges=ranges))
    assert gs.export_onnx(ranged.graph).graph == gs.export_onnx(plain.graph).graph
    assert ranged.report.precision.range_verdict is RangeVerdict.NOTHING_KEPT


def test_parts_observe_what_one_whole_run_observes(decoder, feeds, tmp_path):
    path = _save(decoder, tmp_path)
    parted = observed_max_abs(path, feeds, max_nodes=7)
    assert parted == observed_max_abs(path, feeds, max_nodes=10**9)
    assert len(parted) > len(decoder.graph.node) // 2 and not list(tmp_path.glob(".ranges-part-*"))


def _fp16_overflows(model: onnx.ModelProto, feeds, tmp_path) -> list[str]:
    """fp16 values that are inf where the fp32 graph is finite. Each value is exposed in its declared
    type; a whole-graph CPU session keeps fp16 values in fp32 between two kernels it upcasts, which
    hides an overflow a GPU would show, so the image alone cannot."""
    fp16 = {t.name for t in gs.import_onnx(model).tensors().values() if t.dtype == np.float16}
    return [name for name, peak in observed_max_abs(_save(model, tmp_path), feeds).items()
            if name in fp16 and peak == np.inf]


def test_overflowing_conv_is_kept_fp32_and_the_image_passes_its_gate(decoder, feeds, tmp_path):
    conv = _last_residual_conv(decoder)
    model = _scaled(decoder, conv, OVERFLOW_SCALE)
    expected = _run(model, feeds)
    assert np.isfinite(expected).all()
    assert conv.output[0] in _fp16_overflows(gs.export_onnx(cast_to_fp16(gs.import_onnx(model)).graph), feeds,
                                             tmp_path)

    ranges = _ranges(model, feeds, tmp_path)
    ranged = gs.export_onnx(cast_to_fp16(gs.import_onnx(model), Fp16Options(ranges=ranges)).graph)
    assert _fp16_overflows(ranged, feeds, tmp_path) == []
    actual = _run(ranged, feeds)
    assert np.isfinite(actual).all() and check_output("images", "images", expected, actual, "fp16").passed

    kept = {k.node: k for k in ranges.kept}
    assert conv.name in kept and kept[conv.name].op == "Conv" and kept[conv.name].max_abs > 65504
    assert all(k.max_abs > RANGE_THRESHOLD == k.threshold for k in ranges.kept)
    assert not ranges.whole_graph and 0 < ranges.heavy_kept < ranges.heavy_total / 2


def test_the_pass_report_and_audit_list_the_kept_nodes(decoder, feeds, tmp_path):
    conv = _last_residual_conv(decoder)
    model = _scaled(decoder, conv, OVERFLOW_SCALE)
    ranges = _ranges(model, feeds, tmp_path)
    audit = cast_to_fp16(gs.import_onnx(model), Fp16Options(ranges=ranges)).report.precision
    assert audit.range_verdict is RangeVerdict.ISLANDS and audit.ranges == ranges
    assert audit.only_islands_in_fp32 and audit.fp16_nodes > audit.fp32_nodes
    assert conv.name in audit.fp32_island_nodes
    lines = describe_ranges(ranges)
    assert lines[0].startswith("range finder: islands (threshold 16384;")
    assert any(line.startswith(f"  {conv.name} (Conv): {conv.output[0]} max |x| 1.1") for line in lines)
    assert RangeIslands.from_dict(plain_data(ranges)) == ranges


def test_most_heavy_ops_past_the_threshold_keep_the_whole_graph_fp32(decoder, feeds, tmp_path):
    maxima = {name: peak * 1e5 for name, peak in observed_max_abs(_save(decoder, tmp_path), feeds).items()}
    ranges = range_islands(decoder.graph, maxima)
    assert ranges.whole_graph and ranges.heavy_kept > ranges.heavy_total / 2
    result = cast_to_fp16(gs.import_onnx(decoder), Fp16Options(ranges=ranges))
    audit = result.report.precision
    assert audit.range_verdict is RangeVerdict.WHOLE_GRAPH and audit.fp16_nodes == 0
    assert describe_ranges(ranges)[0].startswith("range finder: whole graph")
    np.testing.assert_allclose(_run(gs.export_onnx(result.graph), feeds), _run(decoder, feeds), rtol=1e-5, atol=1e-5)


def test_values_of_constants_alone_do_not_count():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["big", "big"], ["mask"], name="mask"),
         onnx.helper.make_node("Add", ["x", "mask"], ["y"], name="add")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([-1e4, 0], np.float32), "big")])
    ranges = range_islands(graph, {"x": 1.0, "mask": 1e8, "y": 1e8})
    assert [k.node for k in ranges.kept] == ["add"] and ranges.kept[0].tensor == "y"


def test_optimize_on_disk_finds_the_ranges_of_the_graph_it_casts(decoder, feeds, tmp_path):
    conv = _last_residual_conv(decoder)
    source = _save(_scaled(decoder, conv, OVERFLOW_SCALE), tmp_path)
    _, reports, _ = optimize_on_disk(source, ["cleanup", "fuse-attention", "fp16"], tmp_path / "work",
                                     range_samples=feeds)
    precision = reports["fp16"]["precision"]
    assert precision["range_verdict"] == RangeVerdict.ISLANDS.value and precision["fp32_outside_islands"] == []
    assert conv.name in [k["node"] for k in precision["ranges"]["kept"]]


def test_an_fp16_export_reports_the_range_finder(tmp_path):
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.inspection.artifacts import format_summary, inspect_path
    from sdcompile.options import Precision
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    out = tmp_path / "bundle"
    manifest = export_bundle(ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=out,
                                          components=("text_encoder",), precision=Precision.FP16),
                             log=lambda line: None)
    precision = manifest.components["text_encoder"].report["passes"]["fp16"]["precision"]
    assert precision["range_verdict"] == RangeVerdict.NOTHING_KEPT.value
    assert precision["ranges"]["threshold"] == RANGE_THRESHOLD and precision["ranges"]["kept"] == []
    assert "range finder: nothing kept (threshold 16384;" in format_summary(inspect_path(out))
