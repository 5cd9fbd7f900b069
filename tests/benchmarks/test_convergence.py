"""Convergence curves: on a stand-in model (no bundle) and, briefly, on the tiny bundle's ONNX Runtime UNet."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.charts import convergence_chart
from benchmarks.convergence import ConvergenceResult, Problem, convergence_curves, final_latents
from benchmarks.report import convergence_table
from sdrun.recipe import DDPMSchedule, Parameterization

SD_SCHEDULE = DDPMSchedule(0.00085, 0.012, 1000)


def stand_in_model(x_in: np.ndarray, timestep: float) -> np.ndarray:
    """A smooth deterministic ε-predictor: what a model trained on data near 0.3·sin would predict."""
    return (0.8 * x_in - 0.3 * np.sin(x_in) * (timestep / 1000.0)).astype(np.float32)


@pytest.fixture
def problem() -> Problem:
    noise = np.random.default_rng(0).standard_normal((1, 4, 4, 4), dtype=np.float32)
    return Problem(stand_in_model, SD_SCHEDULE, Parameterization.EPS, 1.0, noise)


def test_ddim_converges_with_steps_and_is_pure(problem):
    curves = convergence_curves(problem, ("ddim", "euler_a"), (5, 50), target_steps=1000)
    ddim, euler_a = curves
    assert ddim.distances[1] < ddim.distances[0]
    assert not ddim.stochastic and euler_a.stochastic
    np.testing.assert_array_equal(final_latents(problem, "euler_a", 5), final_latents(problem, "euler_a", 5))


def test_table_and_chart_name_every_sampler(problem, tmp_path):
    curves = convergence_curves(problem, ("ddim", "dpmpp_2m", "lcm"), (5, 10), target_steps=200)
    result = ConvergenceResult("stand-in ε model", "DDIM, 200 steps", curves)
    text = convergence_table(result)
    assert "| DDIM |" in text and "| LCM (stochastic) |" in text and "10 steps" in text
    path = tmp_path / "convergence.png"
    convergence_chart(result, "stand-in", path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200
    assert json.loads(json.dumps(result.to_dict()))["curves"][1]["sampler"] == "dpmpp_2m"


def test_two_samplers_on_the_tiny_bundle_stay_quick(tiny_bundle, tiny_recipe, tmp_path):
    from benchmarks.config import BenchConfig
    from benchmarks.sampler_table import SOLVER, convergence_run
    from benchmarks.txt2img import generation_requests
    from sdrun.session import load_pipeline

    start = time.perf_counter()
    loaded = load_pipeline(tiny_bundle, SOLVER.backend, step_fusion=False)
    config = BenchConfig(convergence_steps=(5, 50), convergence_target_steps=250)
    result = convergence_run(loaded, generation_requests(config, tiny_recipe)[0], tiny_recipe, config,
                             samplers=("ddim", "dpmpp_2m"))
    convergence_chart(result, "tiny", tmp_path / "convergence.png")
    assert time.perf_counter() - start < 30
    assert result.target == "DDIM, 250 steps" and [c.sampler for c in result.curves] == ["ddim", "dpmpp_2m"]
    ddim, dpmpp_2m = result.curves
    assert ddim.distances[1] < ddim.distances[0]
    assert dpmpp_2m.distances[1] < dpmpp_2m.distances[0]
