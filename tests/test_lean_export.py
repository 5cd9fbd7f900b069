"""Export with the weights on disk: the same graphs as passes in memory, one model at a time, external data.

The bundles of `conftest.py` are exported the lean way; here the same component is traced and optimized
the in-memory way (`onnx.load` with its data, `optimize_model`) and every initializer is compared bit
for bit, fp32 and fp16.
"""
from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sdcompile.options import AttentionImpl, Precision
from sdrun.bundle import read_manifest


def in_memory_export(name: str, recipe, precision: Precision, attention: AttentionImpl, tmp_path) -> onnx.ModelProto:
    from sdcompile.components import component_spec
    from sdcompile.components.spec import dim_multiples, trace_binding
    from sdcompile.export import trace_to_file
    from sdcompile.passes import default_passes, optimize_model
    from sdcompile.weights import RandomWeights, load_models

    spec = component_spec(name, recipe)
    models = load_models(recipe, RandomWeights(0), attention=attention)
    inputs = spec.sample(recipe, trace_binding(recipe), torch.Generator().manual_seed(0))
    trace_to_file(spec.wrap(models, recipe).eval(), inputs, spec.inputs, spec.outputs, dim_multiples(recipe),
                  tmp_path / "model.onnx")
    return optimize_model(onnx.load(str(tmp_path / "model.onnx")), default_passes(precision))[0]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("name, precision, attention, fixture", [
    ("vae_decoder", Precision.FP32, AttentionImpl.SDPA, "tiny_bundle"),
    # the fp16 UNet (the default tier's longest pass run) in the slow tier
    pytest.param("unet", Precision.FP16, AttentionImpl.EXPLICIT, "tiny_bundle_fp16", marks=pytest.mark.slow),
])
def test_passes_on_disk_write_the_graph_passes_in_memory_write(name, precision, attention, fixture, tiny_recipe,
                                                               tmp_path, request):
    bundle = request.getfixturevalue(fixture)
    lean = onnx.load(str(bundle / name / "model.onnx"))
    reference = in_memory_export(name, tiny_recipe, precision, attention, tmp_path)
    assert [n.op_type for n in lean.graph.node] == [n.op_type for n in reference.graph.node]
    ours, theirs = initializers(lean), initializers(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or ours[k].tobytes() != theirs[k].tobytes()]
    assert not different, different[:5]


def test_always_external_data_is_hashed_run_and_inspected(tmp_path):
    from click.testing import CliRunner

    from sdcompile.cli import cli
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle

    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export", "--recipe", "tiny", "--random-weights", "--component", "text_encoder",
                                      "--external-data", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    files = read_manifest(bundle).components["text_encoder"].files
    assert sorted(files) == ["text_encoder/model.onnx", "text_encoder/model.onnx.data", "text_encoder/weight_map.json"]
    opened = open_bundle(bundle, lambda manifest: ["text_encoder"])
    ids = np.zeros((1, 77), np.int32)
    assert make_runners("onnxruntime", opened, ["text_encoder"])["text_encoder"].run({"input_ids": ids})
    inspected = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert inspected.exit_code == 0 and "text_encoder" in inspected.output, inspected.output


def test_the_eager_model_is_freed_before_onnx_runtime_verifies(tmp_path, monkeypatch):
    """Never an eager model and an ONNX Runtime session at once: at verification no model of ours is alive."""
    import sdcompile.bundler as bundler
    from sdcompile.models.text_encoder import build_text_encoder
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    model_type = type(build_text_encoder(load_recipe("tiny").text_encoder))
    alive = []

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, model_type) for o in gc.get_objects()))
        return verify(*args, **kwargs)

    verify = bundler.verify_graph
    monkeypatch.setattr(bundler, "verify_graph", counting)
    bundler.export_bundle(bundler.ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0),
                                               out=tmp_path / "b", components=("text_encoder",)), log=lambda l: None)
    assert alive == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not (tmp_path / "b" / ".work").exists()


def test_no_weight_of_a_traced_module_outlives_it(tiny_recipe, tmp_path):
    """The exporter's rewrite rules remember their last graph, whose initializers are the module's
    parameters; `trace_to_file` makes them forget, so freeing the model frees its weights."""
    import weakref

    from sdcompile.components import component_spec
    from sdcompile.components.spec import dim_multiples, trace_binding
    from sdcompile.export import trace_to_file
    from sdcompile.weights import RandomWeights, load_models
    from sdcompile.weights.layout import Component

    spec = component_spec("text_encoder", tiny_recipe)
    models = load_models(tiny_recipe, RandomWeights(0), parts=(Component.TEXT_ENCODER,))
    module = spec.wrap(models, tiny_recipe).eval()
    inputs = spec.sample(tiny_recipe, trace_binding(tiny_recipe), torch.Generator().manual_seed(0))
    trace_to_file(module, inputs, spec.inputs, spec.outputs, dim_multiples(tiny_recipe), tmp_path / "model.onnx")
    weights = [weakref.ref(p) for p in models.text_encoder.parameters()]
    del module, models, inputs
    gc.collect()
    assert sum(w() is not None for w in weights) == 0


@pytest.mark.parametrize("fixture, attention", [("tiny_bundle", AttentionImpl.SDPA),
                                                ("tiny_bundle_fp16", AttentionImpl.EXPLICIT)])
def test_the_weight_map_names_each_initializers_checkpoint_tensor(fixture, attention, tiny_recipe, request):
    """Every mapped initializer is its checkpoint tensor (transposed where the map says) in the graph's dtype;
    every weight of the checkpoint that a graph holds is mapped."""
    import json

    from sdcompile.weights import RandomWeights, ldm_state_dict, load_models

    bundle = request.getfixturevalue(fixture)
    checkpoint = ldm_state_dict(load_models(tiny_recipe, RandomWeights(0), attention=attention))
    for name in ("text_encoder", "unet", "unet_step", "vae_decoder", "vae_encoder"):
        weight_map = json.loads((bundle / name / "weight_map.json").read_text())
        graph = initializers(onnx.load(str(bundle / name / "model.onnx")))
        assert weight_map["initializers"], name
        for initializer, source in weight_map["initializers"].items():
            tensor = checkpoint[source["checkpoint"]]
            expected = (tensor.t() if source["transform"] == "transpose" else tensor).numpy().astype(source["dtype"])
            assert graph[initializer].dtype == expected.dtype and np.array_equal(graph[initializer], expected), \
                f"{name}: {initializer} is not {source}"
        big = [k for k, v in graph.items() if v.ndim >= 2 and v.size >= 64 and k not in weight_map["initializers"]]
        assert set(big) <= set(weight_map["unmapped"]) and len(big) <= 2, f"{name}: unmapped {big}"


@pytest.mark.slow  # a whole export (1 min); the default tier's exports use absolute paths
def test_a_relative_output_path_exports_derived_components(tmp_path, monkeypatch):
    """Passes run inside their data directories, so every path they are given must survive the change."""
    from click.testing import CliRunner

    from sdcompile.cli import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", "--recipe", "tiny", "--random-weights", "--component", "unet_step",
                                      "--out", "relative/bundle"])
    assert result.exit_code == 0, result.output
    assert sorted(read_manifest(tmp_path / "relative" / "bundle").components) == ["unet", "unet_step"]
