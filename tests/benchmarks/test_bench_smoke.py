"""The benchmark harness end to end on the tiny recipe, with the session's bundles (no re-export)."""
from __future__ import annotations

import json

import diffusers  # noqa: F401 - the peer; a broken install fails here instead of skipping
import matplotlib  # noqa: F401 - the charts
import pytest
from PIL import Image

from benchmarks import provenance
from benchmarks.config import BenchConfig, Scope
from benchmarks.harness import run_benchmark
from benchmarks.provenance import machine_slug
from benchmarks.report import write_results
from sdrun.gates import Gate, Statistic


@pytest.fixture
def bundles(tiny_bundle, tiny_bundle_fp16):
    return {"fp32": tiny_bundle, "fp16": tiny_bundle_fp16}


def test_pipeline_scope_writes_json_table_chart_and_grid(bundles, tmp_path):
    config = BenchConfig(steps=2, repeats=1, warmup=0, prompts=("a lighthouse on a cliff at dawn",), bundles=bundles,
                         sampler_repeats=1, convergence_steps=(2, 4), convergence_target_steps=50)
    started = provenance.started()
    result = run_benchmark(config, log=lambda line: None)
    paths = write_results(result, tmp_path, started, log=lambda line: None)

    assert not result.failed_gates, [g.describe() for g in result.failed_gates]
    data = json.loads(paths["json"].read_text())
    assert data["provenance"]["date_utc"] == started.date_utc
    assert data["provenance"]["threads"]["torch_intra_op"] >= 1
    labels = [v["label"] for v in data["variants"]]
    assert labels[:2] == ["torch fp32 plain", "torch fp32 step-fused"]
    assert {"onnxruntime fp32 step-fused", "onnxruntime fp16 plain"} <= set(labels)
    assert data["peer"]["accuracy"]["image"]["max_abs"] <= 1e-3
    assert {c["component"] for c in data["components"]} == {"text_encoder", "unet", "unet_step", "vae_decoder"}
    stages = data["variants"][2]["latency"]["stages"]
    assert set(stages) >= {"text_encoder", "denoise", "vae_decoder", "overhead", "total", "step"}
    assert data["passed"] and data["exports"] == []
    assert all(set(v["peak_resident_gib"]) >= {"load", "text_encoder", "vae_decoder"} for v in data["variants"])
    text = paths["markdown"].read_text()
    assert "## End to end" in text and "## Per component" in text and "diffusers" in text
    assert "## Peak resident memory" in text
    assert "## Provenance" in text and data["provenance"]["commit"] in text
    for kind in ("chart", "images"):
        with Image.open(paths[kind]) as image:
            assert image.format == "PNG" and image.width > 200
            assert json.loads(image.text[provenance.PNG_KEYWORD]) == data["provenance"]


def test_unet_step_scope_compares_eager_diffusers_and_onnxruntime(bundles, tmp_path):
    config = BenchConfig(scope=Scope.UNET_STEP, repeats=1, warmup=0, bundles=bundles)
    result = run_benchmark(config, log=lambda line: None)
    paths = write_results(result, tmp_path, provenance.started(), log=lambda line: None)

    assert [r.label for r in result.unet_step] == ["torch fp32 (eager)", "diffusers (eager fp32)",
                                                   "onnxruntime fp32", "onnxruntime fp16"]
    assert not result.failed_gates, [g.describe() for g in result.failed_gates]
    assert paths["json"].name.endswith("-tiny-unet-step.json") and "images" not in paths
    targets = json.loads(paths["json"].read_text())["targets"]
    assert [t["name"] for t in targets] == ["onnxruntime fp32 UNet step / eager"]


def test_failing_gate_names_the_tolerance_it_needed():
    gate = Gate(Statistic.PSNR_DB, 30.0, "fp16").judge("onnxruntime fp16 image", {"psnr_db": 27.25})
    assert not gate.passed
    assert "would have needed >= 27.25" in gate.describe()
    assert Gate(Statistic.MAX_ABS, 2 / 255, "fp32").judge("x", {"max_abs": 1 / 255}).passed


def test_machine_slug_is_short_and_plain():
    slug = machine_slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", 8)
    assert slug.endswith("-intel-xeon-platinum-8375c-8c")
    assert slug == slug.lower() and " " not in slug


def test_export_runs_in_its_own_process_with_time_and_peak_memory(tmp_path):
    from benchmarks.exports import export_measured

    measured = export_measured("tiny", "fp32", tmp_path / "bundle", seed=0, components=("text_encoder",),
                               log=lambda line: None)
    assert set(measured.component_seconds) == {"text_encoder"}
    assert measured.seconds > measured.component_seconds["text_encoder"] > 0
    assert measured.peak_rss_mib is None or 100 < measured.peak_rss_mib < 16 * 1024


def test_command_line_help_names_every_option():
    from click.testing import CliRunner

    from benchmarks.__main__ import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--recipe", "--steps", "--repeats", "--warmup", "--out", "--threads", "--unet-step-only"):
        assert option in result.output
