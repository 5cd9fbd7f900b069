"""The device-resident loop's host-side parts, without a GPU: what each step is fed, and from where.

The loop itself (uploads, addresses, CUDA-graph replay) runs only with TensorRT: see
tests/trt/test_trt_gpu.py, where its final latents are compared with the host loop's.
"""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.backends.tensorrt_loop import is_static_profile, row_address, state_buffers_of, step_table
from sdrun.sampling import PER_EVALUATION, draw_noises, step_feeds
from sdrun.samplers import make_plan
from sdrun.samplers.plan import STATE_WIDTH
from sdrun.recipe import DDPMSchedule, Parameterization

LATENT = (1, 4, 8, 8)
DTYPES = {name: np.dtype(np.float32) for name in PER_EVALUATION}


def feeds(sampler: str, steps: int = 7, guidance: float = 7.5):
    rng = np.random.default_rng(0)
    plan = make_plan(sampler, DDPMSchedule(0.00085, 0.012, 1000), Parameterization.EPS, steps)
    noise = rng.standard_normal(LATENT, dtype=np.float32)
    rows = 1 if guidance == 1.0 else 2
    conditioning = {"encoder_hidden_states": rng.standard_normal((rows, 77, 32), dtype=np.float32),
                    "time_ids": np.full((rows, 6), 64.0, np.float32)}
    return step_feeds(plan, noise, conditioning, guidance, draw_noises(plan, LATENT, rng))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "plms"])
def test_row_i_of_the_table_is_what_the_host_loop_feeds_at_evaluation_i(sampler):
    f = feeds(sampler)
    table = step_table(f, DTYPES)
    assert set(table) == set(PER_EVALUATION)
    for e in range(len(f)):
        for name, expected in f.evaluation(e).items():
            np.testing.assert_array_equal(table[name][e], expected, err_msg=f"{name} at evaluation {e}")


def test_the_table_takes_the_engines_dtypes():
    table = step_table(feeds("euler_a", 3), {**DTYPES, "noise": np.dtype(np.float16)})
    assert table["noise"].dtype == np.float16 and table["noise"].flags.c_contiguous


def test_rows_are_addressed_contiguously():
    rows = step_table(feeds("ddim", 5), DTYPES)["update"]
    row_bytes = STATE_WIDTH * (STATE_WIDTH + 2) * 4
    assert [row_address(1000, rows, i) for i in range(3)] == [1000, 1000 + row_bytes, 1000 + 2 * row_bytes]


def test_state_buffers_alternate_and_the_last_output_is_found():
    assert [state_buffers_of(i) for i in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    for steps in (1, 2, 5):
        assert state_buffers_of(steps - 1)[1] == steps % 2


def test_without_guidance_the_conditioning_is_doubled_as_the_fused_graph_expects():
    for guidance in (1.0, 7.5):
        conditioning = feeds("ddim", 2, guidance=guidance).conditioning
        assert {name: rows.shape for name, rows in conditioning.items()} == {"encoder_hidden_states": (2, 77, 32),
                                                                            "time_ids": (2, 6)}


def test_only_static_profiles_can_be_captured():
    static = {"sample": {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}}
    dynamic = {"sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}}
    assert is_static_profile(static) and not is_static_profile(dynamic)


def test_cuda_graph_on_another_backend_is_refused_before_loading(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from sdrun.cli import cli

    result = CliRunner().invoke(cli, ["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--cuda-graph",
                                      "--backend", "onnxruntime", "--out", str(tmp_path / "o.png")],
                                standalone_mode=False)
    assert "replays TensorRT engines" in str(result.exception)
    assert not (tmp_path / "o.png").exists()
