"""Full-size SD 1.5 architecture (random weights): fusion completeness and fp16 gates. Slow tier."""
from __future__ import annotations

import pytest

from sdcompile.bundler import ExportConfig, export_bundle
from sdcompile.inspection import inspect_path
from sdcompile.options import AttentionImpl, Precision
from sdcompile.recipes import load_recipe
from sdcompile.weights import RandomWeights
from sdrun.bundle import read_manifest

pytestmark = pytest.mark.slow

SD15_ATTENTIONS = {"unet": (16, 16), "text_encoder": (12, 0), "vae_decoder": (1, 0)}  # (self, cross)


@pytest.fixture(scope="module")
def sd15_fp16_bundle(tmp_path_factory):
    """SD 1.5 text encoder, UNet and VAE decoder, traced with explicit attention, cast to fp16."""
    out = tmp_path_factory.mktemp("sd15") / "bundle"
    config = ExportConfig(recipe=load_recipe("sd15"), source=RandomWeights(0), out=out,
                          components=tuple(SD15_ATTENTIONS), precision=Precision.FP16,
                          attention=AttentionImpl.EXPLICIT)
    export_bundle(config, log=print)  # the export itself gates each component against eager fp32
    return out


def test_every_sd15_attention_is_fused(sd15_fp16_bundle):
    summary = inspect_path(sd15_fp16_bundle)
    for name, (self_count, cross_count) in SD15_ATTENTIONS.items():
        attention = summary["components"][name]["attention"]
        assert attention["fused"] == self_count + cross_count and attention["unfused"] == 0, name


def test_sd15_fp16_components_pass_their_gates_with_islands_only(sd15_fp16_bundle):
    manifest = read_manifest(sd15_fp16_bundle)
    summary = inspect_path(sd15_fp16_bundle)
    for name in SD15_ATTENTIONS:
        gates = manifest.components[name].report["verification"]
        print(name, [(g["statistic"], g["value"]) for g in gates])
        assert all(g["passed"] for g in gates)
        assert summary["components"][name]["precision"]["fp32_outside_islands"] == []


@pytest.mark.parametrize("recipe", ["sd21", "sd21-base"])
def test_sd2_text_encoder_exports_through_the_cli(tmp_path, recipe):
    """The SD 2.x text tower carries a 0-dim `logit_scale`; the weights hash and export must take it."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bundle"
    command = [str(Path(sys.executable).parent / "sdcompile"), "export", "--recipe", recipe, "--random-weights",
               "--component", "text_encoder", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert finished.returncode == 0, finished.stderr[-2000:]
    gates = read_manifest(out).components["text_encoder"].report["verification"]
    assert all(g["passed"] for g in gates), gates
