"""The device-resident loop's host-side parts, without a GPU: what each step is fed, and from where.

The loop itself (uploads, addresses, CUDA-graph replay) runs only with TensorRT: see
tests/trt/test_trt_gpu.py, where its final latents are compared with the host loop's.
"""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.backends.base import DenoisePlan
from sdrun.backends.tensorrt_loop import (guided_context, is_static_profile, latent_buffers_of, row_address,
                                          step_table)

LATENT = (1, 4, 8, 8)
DTYPES = {name: np.dtype(np.float32) for name in ("timestep", "guidance", "step_coefficients", "noise")}


def plan(steps: int, guidance: float = 7.5, stochastic: bool = False) -> DenoisePlan:
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(steps).astype(np.float32) for _ in range(3)]
    noise = rng.standard_normal((steps, *LATENT), dtype=np.float32) if stochastic else None
    return DenoisePlan(timesteps=np.arange(steps, 0, -1, dtype=np.float32) * 100, c_x=values[0], c_out=values[1],
                       sigma=values[2], guidance=guidance, noise=noise)


def host_loop_feeds(p: DenoisePlan, step: int) -> dict[str, np.ndarray]:
    """What `sdrun.pipeline.denoise` hands the step-fused graph at `step` (besides sample and context)."""
    noise = p.noise[step] if p.noise is not None else np.zeros(LATENT, np.float32)
    return {"timestep": p.timesteps[step:step + 1], "guidance": np.array([p.guidance], np.float32),
            "step_coefficients": np.array([p.c_x[step], p.c_out[step], p.sigma[step]], np.float32), "noise": noise}


@pytest.mark.parametrize("stochastic", [False, True])
def test_row_i_of_the_table_is_what_the_host_loop_feeds_at_step_i(stochastic):
    p = plan(7, stochastic=stochastic)
    table = step_table(p, LATENT, DTYPES)
    for step in range(p.steps):
        for name, expected in host_loop_feeds(p, step).items():
            np.testing.assert_array_equal(table[name][step], expected, err_msg=f"{name} at step {step}")


def test_the_table_takes_the_engines_dtypes():
    table = step_table(plan(3), LATENT, {**DTYPES, "noise": np.dtype(np.float16)})
    assert table["noise"].dtype == np.float16 and table["noise"].flags.c_contiguous


def test_rows_are_addressed_contiguously():
    table = step_table(plan(5), LATENT, DTYPES)
    rows = table["step_coefficients"]
    assert [row_address(1000, rows, i) for i in range(3)] == [1000, 1012, 1024]  # 3 float32 per row


def test_latent_buffers_alternate_and_the_last_output_is_found():
    assert [latent_buffers_of(i) for i in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    for steps in (1, 2, 5):
        assert latent_buffers_of(steps - 1)[1] == steps % 2


def test_without_guidance_the_context_is_doubled_as_the_fused_graph_expects():
    context = np.ones((1, 77, 32), np.float32)
    assert guided_context(context, plan(2, guidance=1.0)).shape == (2, 77, 32)
    assert guided_context(np.ones((2, 77, 32), np.float32), plan(2)).shape == (2, 77, 32)


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
