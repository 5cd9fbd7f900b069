"""`sdrun txt2img --profile DIR` on the tiny bundle: a Chrome trace that loads as JSON with events of every
component, and a summary whose per-component backend times add up to within 5% of the timing table."""
from __future__ import annotations

import json

import pytest

from sdrun.profiling import SUMMARY_JSON, SUMMARY_MD, TRACE_FILE

STEPS = 3
AGREEMENT = 0.05  # the summary's component times against the timing table's stages


@pytest.fixture(scope="module")
def profiled(tiny_bundle, tmp_path_factory):
    from sdrun.cli import main

    directory = tmp_path_factory.mktemp("profile")
    main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "a lighthouse", "--steps", str(STEPS),
          "--backend", "onnxruntime", "--out", str(directory / "out.png"), "--profile", str(directory / "p"),
          "--quiet"])
    return directory / "p"


def test_the_trace_has_events_of_every_component(profiled):
    events = json.loads((profiled / TRACE_FILE).read_text())["traceEvents"]
    named = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert set(named.values()) == {"text_encoder", "unet_step", "vae_decoder"}
    assert all(any(e["pid"] == pid and e.get("cat") == "Node" for e in events) for pid in named)


def test_the_summary_adds_up_to_the_timing_table(profiled):
    summary = json.loads((profiled / SUMMARY_JSON).read_text())
    components = summary["components"]
    table = summary["timing_table_ms"]
    backend = sum(c["backend_ms"] for c in components.values())
    stages = table["text_encoder"] + table["denoise"] + table["vae_decoder"]
    assert abs(backend - stages) <= AGREEMENT * stages, (backend, stages)
    assert components["unet_step"]["calls"] == STEPS and len(summary["denoising_step_ms"]) == STEPS
    assert set(summary["unet"]["shares"]) == {"attention", "group_norm", "convolution"}
    assert set(summary["host_peak_gib"]) == {"load", "text_encoder", "unet_step", "vae_decoder"}
    assert all(c["top_op_types"] and c["top_nodes"] for c in components.values())
    assert "## unet_step" in (profiled / SUMMARY_MD).read_text()
