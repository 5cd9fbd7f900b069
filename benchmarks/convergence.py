"""Convergence: how close each sampler's final latents come, per step count, to a converged ODE solution.

The target is DDIM (eta 0, ldm's discretization) at 1000 steps on the same model, prompt, initial noise
and guidance: DDIM is the probability-flow ODE's first-order solver (Song et al. 2021, §4.3), so at the
full training schedule it is that ODE's solution from t = 999 to 0. The distance is the relative L2 of
the final latents, ‖x − x_ref‖ / ‖x_ref‖. Samplers that draw fresh noise each step (Euler a, DPM++ 2M
SDE, LCM) sample another process and do not converge to that solution; they are marked `stochastic`
and drawn dashed. Numerics only: `final_latents` and `convergence_curves` take a model function.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sdrun.metrics import relative_l2
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers import SAMPLERS, make_plan, run_plan

STEP_COUNTS = (5, 10, 20, 30, 50)
TARGET_SAMPLER = "ddim"
TARGET_STEPS = 1000

Model = Callable[[np.ndarray, float], np.ndarray]  # (c_in·x, timestep) -> guided ε or v


@dataclasses.dataclass(frozen=True)
class Problem:
    """One ODE to solve: the model, its training schedule, guidance and the unit-variance initial noise."""

    model: Model
    schedule: DDPMSchedule
    parameterization: Parameterization
    guidance: float
    init_noise: np.ndarray  # (1, C, h, w) float32
    noise_seed: int = 0  # stochastic samplers' per-step noise: default_rng(noise_seed), drawn in order


@dataclasses.dataclass(frozen=True)
class Curve:
    sampler: str  # short id
    label: str  # as the web UIs write it
    stochastic: bool  # draws fresh noise per step: not a solver of the target ODE
    steps: tuple[int, ...]
    distances: tuple[float, ...]  # relative L2 to the target, one per step count

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConvergenceResult:
    model: str  # which runner solved it, e.g. "onnxruntime fp32 plain UNet"
    target: str  # "DDIM, 1000 steps"
    curves: tuple[Curve, ...]

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "curves": [c.to_dict() for c in self.curves]}


def final_latents(problem: Problem, sampler: str, steps: int) -> np.ndarray:
    """The sampler's final latents after `steps` steps on `problem` (noise from `noise_seed`)."""
    plan = make_plan(sampler, problem.schedule, problem.parameterization, steps, guidance=problem.guidance)
    rng = np.random.default_rng(problem.noise_seed)
    noises = [rng.standard_normal(problem.init_noise.shape, dtype=np.float32) if needed else None
              for needed in plan.needs_noise]
    return run_plan(plan, problem.model, problem.init_noise, noises)


def is_stochastic(problem: Problem, sampler: str) -> bool:
    """Whether the sampler's update takes fresh noise (DDIM at eta 0 does not)."""
    plan = make_plan(sampler, problem.schedule, problem.parameterization, 2, guidance=problem.guidance)
    return bool(plan.needs_noise.any())


def convergence_curves(problem: Problem, samplers: Sequence[str] = tuple(SAMPLERS),
                       step_counts: Sequence[int] = STEP_COUNTS, target_steps: int = TARGET_STEPS,
                       log: Callable[[str], None] = lambda line: None) -> tuple[Curve, ...]:
    """Per sampler, the relative L2 of its final latents at each step count to DDIM at `target_steps`."""
    target = final_latents(problem, TARGET_SAMPLER, target_steps)
    curves = []
    for sampler in samplers:
        distances = tuple(relative_l2(target, final_latents(problem, sampler, n)) for n in step_counts)
        curves.append(Curve(sampler, SAMPLERS[sampler].label, is_stochastic(problem, sampler), tuple(step_counts),
                            distances))
        log(f"convergence {SAMPLERS[sampler].label}: " + ", ".join(
            f"{n} steps {d:.3g}" for n, d in zip(step_counts, distances)))
    return tuple(curves)
