"""A sampler's plan: per model evaluation, the UNet's timestep and input scale and a linear update.

The state is a list of W tensors of the latent's shape: slot 0 is the latent x the UNet sees next,
slots 1..W-1 hold what a method remembers (earlier model outputs or denoised estimates, a
two-stage method's start point); they start at zero. Evaluation e computes

    y_e        = model(c_in[e] · state[0], timesteps[e])            # guided ε or v
    new_state  = A[e] @ [state[0], ..., state[W-1], y_e] + noise_scale[e] ⊗ z_e

A[e] is (W, W + 1); the parameterization's conversion of y_e to a denoised estimate is folded in.
z_e is unit-variance noise passed in for the evaluations where `noise_scale[e]` is nonzero.
The initial state is [init_scale · z_init, 0, ..., 0]; the result is state[0] after the last
evaluation. An img2img plan starts part-way down the schedule from an encoded image x_0 instead:
its initial state is [x0_scale · x_0 + init_scale · z_init, 0, ..., 0], the forward noising
q(x_t | x_0) written in the sampler's own latent (x_0 + s·z for the Karras-form samplers,
sqrt(ᾱ)·x_0 + sqrt(1 - ᾱ)·z for the VP ones), and its stored slots start at zero there.

A sampler describes itself as a list of `Evaluation`s whose `update` is written with ordinary
arithmetic over (state, y, z). Because the update is linear, calling it on basis vectors
yields the matrix rows (`build_plan`); calling it on arrays is the sampler's reference loop.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Update = Callable[[list, object, object], list]

STATE_WIDTH = 5  # W of the step-fused graph: the widest sampler's state (PLMS: x and four ε̂)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One model evaluation: UNet timestep, input scale c_in, and the linear update of the state."""

    timestep: float
    c_in: float
    update: Update  # (state: list[W], y, z) -> new state list[W]


@dataclasses.dataclass(frozen=True)
class Program:
    """A sampler's evaluations as written by its family: the source `build_plan` compiles."""

    width: int  # W: the latent plus the K tensors the method stores
    evaluations: tuple[Evaluation, ...]
    init_scale: float
    warnings: tuple[str, ...] = ()
    x0_scale: float = 0.0  # img2img: state[0] starts at x0_scale·x_0 + init_scale·z


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything a loop (host or graph) needs to run one sampler for one step count."""

    name: str
    timesteps: np.ndarray  # (E,) float64, fed to the UNet (fractional under Karras sigmas)
    c_in: np.ndarray  # (E,) float64, the UNet sees c_in·state[0]
    A: np.ndarray  # (E, W, W + 1) float64, over [state..., model output]
    noise_scale: np.ndarray  # (E, W) float64, per state slot, times z_e
    init_scale: float  # diffusers' init_noise_sigma: state[0] starts at init_scale·z
    warnings: tuple[str, ...] = ()
    x0_scale: float = 0.0  # img2img plans: state[0] starts at x0_scale·x_0 + init_scale·z

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def width(self) -> int:
        """W: the number of state tensors (the latent plus K stored ones)."""
        return self.A.shape[1]

    @property
    def needs_noise(self) -> np.ndarray:
        """(E,) bool: evaluations whose update takes a noise tensor."""
        return np.any(self.noise_scale != 0.0, axis=1)


def fused_update_rows(plan: Plan, width: int = STATE_WIDTH) -> np.ndarray:
    """(E, width, width + 2) float32: A[e] and noise_scale[e] over [state_0..state_{width-1}, y, z],
    the plan's W slots padded with zero slots that stay zero (the step-fused graph's `update`)."""
    if plan.width > width:
        raise ValueError(f"{plan.name} keeps {plan.width} state tensors; the step-fused graph holds {width}")
    w = plan.width
    rows = np.zeros((len(plan), width, width + 2))
    rows[:, :w, :w] = plan.A[:, :, :w]
    rows[:, :w, width] = plan.A[:, :, w]
    rows[:, :w, width + 1] = plan.noise_scale
    return rows.astype(np.float32)


def build_plan(name: str, program: Program) -> Plan:
    """Read each evaluation's matrix off its update applied to the basis [state..., y, z]."""
    w, evaluations = program.width, program.evaluations
    basis = list(np.eye(w + 2))
    rows = np.stack([np.stack(e.update(basis[:w], basis[w], basis[w + 1]))
                     for e in evaluations])  # (E, W, W + 2)
    return Plan(name=name,
                timesteps=_frozen([e.timestep for e in evaluations]),
                c_in=_frozen([e.c_in for e in evaluations]),
                A=_frozen(rows[:, :, :w + 1]), noise_scale=_frozen(rows[:, :, w + 1]),
                init_scale=float(program.init_scale), warnings=program.warnings,
                x0_scale=float(program.x0_scale))


def _frozen(values) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    array.flags.writeable = False
    return array


def initial_state(plan: Plan, noise: np.ndarray, x0: np.ndarray | None = None) -> list:
    """[init_scale·z (+ x0_scale·x_0), 0, ...]: `noise` is unit-variance (`--init-noise`), `x0`
    the encoded image of an img2img plan."""
    x = plan.init_scale * noise
    if plan.x0_scale != 0.0:
        if x0 is None:
            raise ValueError(f"{plan.name} is an img2img plan: it starts from an encoded image x0")
        x = x + plan.x0_scale * x0
    x = x.astype(noise.dtype, copy=False)
    return [x] + [np.zeros_like(x) for _ in range(plan.width - 1)]


def model_input(plan: Plan, e: int, state: list) -> np.ndarray:
    """What the UNet sees at evaluation e: c_in[e]·state[0]."""
    return (plan.c_in[e] * state[0]).astype(state[0].dtype, copy=False)


def apply_plan_step(plan: Plan, e: int, state: list, model_output: np.ndarray,
                    noise: np.ndarray | None = None) -> list:
    """new_state = A[e] @ [state..., model_output] + noise_scale[e]·noise (zero terms skipped)."""
    if noise is None and plan.needs_noise[e]:
        raise ValueError(f"evaluation {e} of {plan.name} needs a noise tensor")
    operands = list(state) + [model_output]
    return [_combine(plan.A[e, i], operands, plan.noise_scale[e, i], noise, model_output)
            for i in range(plan.width)]


def _combine(coefficients, operands, noise_scale, noise, like) -> np.ndarray:
    total = np.zeros_like(like)
    for c, operand in zip(coefficients, operands):
        if c != 0.0:
            total = total + c * operand
    if noise_scale != 0.0:
        total = total + noise_scale * noise
    return total.astype(like.dtype, copy=False)


def run_plan(plan: Plan, model: Callable, init_noise: np.ndarray, noises: Sequence | None = None,
             callback: Callable | None = None, x0: np.ndarray | None = None,
             blend: Callable | None = None) -> np.ndarray:
    """The host loop: `model(x_in, t)` -> guided output; `noises[e]` for evaluations that need it;
    `x0` the encoded image of an img2img plan; `blend(e, state[0])` replaces state[0] after evaluation e
    (inpainting's latent blending)."""
    state = initial_state(plan, init_noise, x0)
    for e in range(len(plan)):
        y = model(model_input(plan, e, state), plan.timesteps[e])
        state = apply_plan_step(plan, e, state, y, None if noises is None else noises[e])
        if blend is not None:
            state[0] = blend(e, state[0])
        if callback is not None:
            callback(e, state[0])
    return state[0]


def run_program(program: Program, model: Callable, init_noise: np.ndarray,
                noises: Sequence | None = None, callback: Callable | None = None,
                x0: np.ndarray | None = None) -> np.ndarray:
    """The sampler's own reference loop: its updates on arrays, no matrices involved."""
    x = program.init_scale * init_noise + (0.0 if x0 is None else program.x0_scale * x0)
    state = [x] + [np.zeros_like(x) for _ in range(program.width - 1)]
    for e, evaluation in enumerate(program.evaluations):
        y = model(evaluation.c_in * state[0], evaluation.timestep)
        z = np.zeros_like(x) if noises is None else noises[e]
        state = [s + np.zeros_like(x) for s in evaluation.update(state, y, z)]
        if callback is not None:
            callback(e, state[0])
    return state[0]
