"""`sdcompile export / inspect / optimize` on the tiny recipe: accuracy, fusion, precision, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from sdcompile.cli import cli
from sdcompile.components import component_spec, recipe_component_names
from sdcompile.inspection import inspect_path
from sdcompile.recipes import RECIPES_DIR, load_recipe
from sdcompile.weights import RandomWeights, load_models
from sdrun.gates import FP16_IMAGE_OUTPUT, FP16_OUTPUT, FP32_OUTPUT
from sdrun.bundle import ShapeBinding, read_manifest
from sdrun.errors import UserError
from sdrun.metrics import compare

# Attentions in the tiny recipe per component: (self, cross, causal).
TINY_ATTENTIONS = {"text_encoder": (2, 0, 2), "unet": (7, 7, 0), "vae_decoder": (1, 0, 0), "vae_encoder": (1, 0, 0)}
OTHER_SHAPE = ShapeBinding(batch=1, cfg_batch=2, image_height=48, image_width=96, vae_scale=8)
TINY_COMPONENTS = recipe_component_names(load_recipe("tiny"))


def _invoke(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), standalone_mode=False, catch_exceptions=True)
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    assert result.exception is None, repr(result.exception)
    return 0, result.output


@pytest.fixture(scope="module")
def tiny_models():
    return load_models(load_recipe("tiny"), RandomWeights(0))


def _graph_vs_eager(bundle, name, models, binding):
    """Run one component at a shape other than the traced one, on ONNX Runtime and eagerly."""
    recipe = load_recipe("tiny")
    spec = component_spec(name, recipe)
    inputs = spec.sample(recipe, binding, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = spec.wrap(models, recipe)(*inputs.values()).numpy()
    session = ort.InferenceSession(str(bundle / name / "model.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    return expected, actual


def test_manifest_describes_every_component(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert list(manifest.components) == TINY_COMPONENTS
    assert manifest.source == {"kind": "random", "seed": 0} and len(manifest.weights_sha256) == 64
    assert manifest.tokenizer["pad_id"] == 49407 and manifest.tools["torch"]
    unet = manifest.components["unet"]
    assert unet.profile["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert unet.passes == ("cleanup", "fuse-attention") and unet.precision == "fp32"
    for record in manifest.components.values():
        assert all(len(digest) == 64 for digest in record.files.values())
        assert all(gate["passed"] for gate in record.report["verification"])


@pytest.mark.parametrize("name", TINY_COMPONENTS)
def test_fp32_graph_matches_eager_at_another_shape(tiny_bundle, tiny_models, name):
    expected, actual = _graph_vs_eager(tiny_bundle, name, tiny_models, OTHER_SHAPE)
    assert compare(expected, actual).rel_l2 <= FP32_OUTPUT.threshold


@pytest.mark.parametrize("name", TINY_COMPONENTS)
def test_fp16_graph_meets_its_gate_at_another_shape(tiny_bundle_fp16, tiny_models, name):
    expected, actual = _graph_vs_eager(tiny_bundle_fp16, name, tiny_models, OTHER_SHAPE)
    result = compare(expected, actual.astype(np.float32), data_range=2.0)
    if name == "vae_decoder":
        assert result.psnr_db >= FP16_IMAGE_OUTPUT.threshold, result
    else:
        assert result.cosine >= FP16_OUTPUT.threshold, result


def test_explicit_attention_is_fused_completely(tiny_bundle_fp16):
    manifest = read_manifest(tiny_bundle_fp16)
    summary = inspect_path(tiny_bundle_fp16)
    for name, (self_count, cross_count, causal) in TINY_ATTENTIONS.items():
        report = manifest.components[name].report["passes"]["fuse-attention"]
        assert report["self_attention"]["found"] == report["self_attention"]["fused"] == self_count
        assert report["cross_attention"]["found"] == report["cross_attention"]["fused"] == cross_count
        assert report["causal"]["fused"] == causal and not report["not_fused"]
        attention = summary["components"][name]["attention"]
        assert attention["fused"] == self_count + cross_count and attention["unfused"] == 0


def test_fp16_bundle_has_no_fp32_compute_outside_the_islands(tiny_bundle_fp16):
    summary = inspect_path(tiny_bundle_fp16)
    for name, component in summary["components"].items():
        precision = component["precision"]
        assert precision["fp16_nodes"] > precision["fp32_nodes"], name
        assert precision["fp32_outside_islands"] == [], name


def test_inspect_cli_text_and_json(tiny_bundle_fp16):
    code, text = _invoke("inspect", tiny_bundle_fp16)
    assert code == 0 and "unet: " in text and "14 fused, 0 unfused" in text and "0 outside" in text
    code, text = _invoke("inspect", tiny_bundle_fp16 / "unet" / "model.onnx", "--json")
    summary = json.loads(text)
    assert summary["kind"] == "onnx" and summary["ops"]["Attention"] == 14 and summary["size_bytes"] > 0


def test_unknown_component_and_recipe(tmp_path):
    code, text = _invoke("export", "--recipe", "tiny", "--random-weights", "--component", "clip", "--out", tmp_path / "b")
    assert code == 2 and "unknown component 'clip'" in text and "vae_decoder" in text
    code, text = _invoke("export", "--recipe", "sd3", "--random-weights", "--out", tmp_path / "b")
    assert code == 2 and "unknown recipe 'sd3'" in text
    code, text = _invoke("export", "--recipe", "tiny", "--random-weights", "--component", "text_encoder_2",
                         "--out", tmp_path / "b")
    assert code == 2 and "recipe tiny has no component text_encoder_2" in text
    assert not (tmp_path / "b").exists()


def test_opset_too_low_for_attention_target_is_refused_before_work(tmp_path):
    code, text = _invoke("export", "--recipe", "tiny", "--random-weights", "--opset", "18", "--out", tmp_path / "b")
    assert code == 2 and "too low for the ONNX Attention target" in text and "--opset 23" in text
    assert not (tmp_path / "b").exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = _invoke("export", "--recipe", "tiny", "--random-weights", "--out", blocker / "bundle")
    assert code == 2 and "cannot create the output location" in text


def test_reexport_from_other_weights_or_recipe_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    code, text = _invoke("export", "--recipe", "tiny", "--random-weights", "--seed", "1",
                         "--component", "text_encoder", "--out", bundle)
    assert code == 2 and "other weights" in text and "--force" in text
    other_recipe = tmp_path / "other.toml"
    other_recipe.write_text((RECIPES_DIR / "tiny.toml").read_text().replace('name = "tiny"', 'name = "tiny2"'))
    code, text = _invoke("export", "--recipe", other_recipe, "--random-weights", "--component", "text_encoder",
                         "--out", bundle)
    assert code == 2 and "recipe 'tiny'" in text
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_interrupted_export_leaves_the_previous_bundle_intact(tiny_bundle, tmp_path, monkeypatch):
    import sdcompile.bundler as bundler

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundler, "save_graph", interrupted)  # after the trace and the passes wrote work files
    with pytest.raises(KeyboardInterrupt):
        bundler.export_bundle(bundler.ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=bundle,
                                                   components=("unet",)), log=lambda line: None)
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.slow  # a second export into a copied bundle (15 s)
def test_adding_a_component_keeps_the_others(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    shutil.rmtree(bundle / "vae_encoder")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, _ = _invoke("export", "--recipe", "tiny", "--random-weights", "--component", "vae_encoder", "--out", bundle)
    assert code == 0
    after = read_manifest(bundle)
    assert list(after.components) == ["text_encoder", "unet", "unet_step", "vae_decoder", "vae_encoder"]
    assert after.components["unet"].files == read_manifest(tiny_bundle).components["unet"].files


@pytest.mark.parametrize("content", [b"definitely not onnx", None])
def test_optimize_refuses_non_onnx_and_truncated_files(tiny_bundle, tmp_path, content):
    source = tmp_path / "in.onnx"
    source.write_bytes(content if content is not None else (tiny_bundle / "unet" / "model.onnx").read_bytes()[:5000])
    code, text = _invoke("optimize", source, "-o", tmp_path / "out.onnx")
    assert code == 2 and ("not a readable ONNX model" in text or "holds no graph nodes" in text)
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_fuses_a_diffusers_unet_exported_by_torchscript(tmp_path):
    """A graph we did not export: diffusers' UNet through the TorchScript exporter (opset 17)."""
    import diffusers
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=32).eval()
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([501.0]), torch.randn(2, 77, 32))

    class Plain(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    source = tmp_path / "diffusers_unet.onnx"
    with torch.no_grad():
        torch.onnx.export(Plain(unet), inputs, str(source), dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["latent"])
    code, text = _invoke("optimize", source, "-o", tmp_path / "fused.onnx")
    assert code == 0, text
    summary = inspect_path(tmp_path / "fused.onnx")
    assert summary["attention"]["fused"] == 14 and summary["attention"]["unfused"] == 0
    feeds = {name: t.numpy() for name, t in zip(("sample", "timestep", "encoder_hidden_states"), inputs)}
    before = ort.InferenceSession(str(source)).run(None, feeds)[0]
    after = ort.InferenceSession(str(tmp_path / "fused.onnx")).run(None, feeds)[0]
    assert compare(before, after).rel_l2 <= FP32_OUTPUT.threshold
