"""`python -m benchmarks --export-only`: each component's export in its own process, against its weights."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from benchmarks import export_memory
from benchmarks.__main__ import main
from benchmarks.export_phases import ExportPhase, phases_from_log
from sdrun.errors import UserError

TINY_BASES = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def test_one_export_writes_json_and_table_with_peak_over_weights(tmp_path):
    result = CliRunner().invoke(main, ["--recipe", "tiny", "--export-only", "--component", "text_encoder",
                                       "--precision", "fp32", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (json_path,) = tmp_path.glob("*-tiny-export.json")
    data = json.loads(json_path.read_text())
    (row,) = data["rows"]
    assert (row["component"], row["precision"], row["error"]) == ("text_encoder", "fp32", None)
    assert row["export"]["seconds"] > 0 and row["fp32_weight_bytes"] > 0
    if row["export"]["peak_rss_mib"] is not None:
        assert row["peak_over_weights"] == pytest.approx(row["export"]["peak_rss_mib"] * 2**20
                                                         / row["fp32_weight_bytes"])
        assert row["target_met"] == (row["peak_over_weights"] <= data["target"]["value"])
    assert {p["phase"] for p in row["export"]["phases"]} >= {"traced (opset 23)", "verified"}
    assert data["passed"] and data["provenance"]["commit"]
    text = json_path.with_suffix(".md").read_text()
    assert "| component | precision | wall s | peak RSS GiB | fp32 weights GiB | peak / weights | target ≤ 1.5 |" \
        in text and "## Provenance" in text


def test_a_failed_export_is_listed_and_exits_1(tmp_path, monkeypatch):
    def failing(recipe, precision, out, seed, components, log):
        raise UserError("`sdcompile export --recipe tiny --precision fp16` failed (exit 1).", got="MemoryError")

    monkeypatch.setattr(export_memory, "export_measured", failing)
    result = CliRunner().invoke(main, ["--export-only", "--component", "unet", "--precision", "fp16",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 1
    (md,) = tmp_path.glob("*-tiny-export.md")
    assert "| unet | fp16 | FAILED |" in md.read_text() and "1 of 1 exports FAILED" in md.read_text()


def test_default_targets_are_every_base_component_then_all(tiny_recipe):
    bases = export_memory.base_components(tiny_recipe)
    assert bases == TINY_BASES
    assert export_memory.export_targets(None, bases) == [*TINY_BASES, "all"]
    assert export_memory.export_targets(("all", "unet"), bases) == ["unet", "all"]
    with pytest.raises(UserError, match="unet_step"):
        export_memory.export_targets(("unet_step",), bases)


def test_weights_counted_on_meta_match_the_loaded_model(tiny_recipe):
    from sdcompile.weights import RandomWeights, load_models
    from benchmarks.weight_bytes import fp32_weight_bytes, used_parameters

    counted = fp32_weight_bytes(tiny_recipe, TINY_BASES, log=lambda line: None)
    models = load_models(tiny_recipe, RandomWeights(0))
    for name in TINY_BASES:
        assert counted[name] == 4 * sum(used_parameters(name, models, tiny_recipe).values()), name
    vae_bytes = 4 * sum(p.numel() for p in models.vae.parameters())
    assert counted["vae_decoder"] + counted["vae_encoder"] <= vae_bytes  # each graph holds its half of the VAE
    assert counted["all"] == sum(counted[name] for name in TINY_BASES)


def test_phase_lines_are_parsed_and_other_lines_ignored():
    lines = ["loading tiny weights (random weights, seed 0)",
             "[unet] traced (opset 23): 12.3 s, 4.1 GiB resident",
             "[unet] gate latent: rel_l2 = 1.3e-06 (gate <= 1e-05) ok",
             "  [unet] passes cleanup, fuse-attention, fp16: 0.8 s, 0.9 GiB resident (peak 4.2 GiB)"]
    assert phases_from_log(lines) == (ExportPhase("unet", "traced (opset 23)", 12.3, 4.1),
                                      ExportPhase("unet", "passes cleanup, fuse-attention, fp16", 0.8, 0.9, 4.2))
