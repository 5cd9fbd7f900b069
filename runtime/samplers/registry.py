"""The samplers users pick, by the names the web UIs write and by short ids."""
from __future__ import annotations

import dataclasses
from typing import Callable

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers import ddim, dpm_solver, euler, lcm, plms, unipc
from sdrun.samplers.discretize import Spacing, parse_spacing
from sdrun.samplers.plan import Plan, Program, build_plan


@dataclasses.dataclass(frozen=True)
class Sampler:
    id: str  # short id: `dpmpp_2m_karras`
    label: str  # as the web UIs write it: "DPM++ 2M Karras"
    description: str
    build: Callable[..., Program] = dataclasses.field(repr=False)
    default_spacing: Spacing | None  # diffusers' `from_config` default; None: ldm's discretization
    karras: bool = False  # Karras sigmas on by default (the "… Karras" names)
    has_sigmas: bool = False  # offers Karras sigmas (diffusers `use_karras_sigmas`)
    min_steps: int = 1
    stochastic: bool = False  # takes `eta` or draws fresh noise per step


def _entries(family: Sampler) -> tuple[Sampler, ...]:
    """The sampler and, where it has sigmas, its "… Karras" twin."""
    if not family.has_sigmas:
        return (family,)
    twin = dataclasses.replace(family, id=family.id + "_karras", label=family.label + " Karras",
                               description=family.description + ", Karras sigmas", karras=True)
    return family, twin


_FAMILIES = (
    Sampler("ddim", "DDIM", "DDIM (Song et al. 2021), ldm's uniform timesteps; eta 0 deterministic",
            ddim.ddim, None, stochastic=True),
    Sampler("euler", "Euler", "Euler's method on the probability-flow ODE (Karras et al. 2022)",
            euler.euler, Spacing.LINSPACE, has_sigmas=True),
    Sampler("euler_a", "Euler a", "Euler ancestral: Euler steps plus fresh noise each step",
            euler.euler_ancestral, Spacing.LINSPACE, stochastic=True),
    Sampler("heun", "Heun", "Heun's 2nd-order method, two model evaluations per step",
            euler.heun, Spacing.LINSPACE, has_sigmas=True),
    Sampler("dpmpp_2m", "DPM++ 2M", "DPM-Solver++ multistep, 2nd order (Lu et al. 2022)",
            dpm_solver.dpmpp_2m, Spacing.LINSPACE, has_sigmas=True),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", "DPM-Solver++ 2M on the SDE: fresh noise each step",
            dpm_solver.dpmpp_2m_sde, Spacing.LINSPACE, has_sigmas=True, stochastic=True),
    Sampler("unipc", "UniPC", "UniPC predictor-corrector, bh2, 2nd order (Zhao et al. 2023)",
            unipc.unipc, Spacing.LINSPACE, has_sigmas=True),
    Sampler("plms", "PLMS", "Pseudo linear multistep (Liu et al. 2022) as ldm runs it",
            plms.plms, None, min_steps=2),
    Sampler("lcm", "LCM", "Latent consistency sampling for LCM models and LoRAs (2-8 steps)",
            lcm.lcm, Spacing.LEADING, stochastic=True),
)
SAMPLERS: dict[str, Sampler] = {s.id: s for family in _FAMILIES for s in _entries(family)}


def _key(name: str) -> str:
    return name.strip().lower().replace("+", "p").replace(" ", "_").replace("-", "_")


_BY_NAME = {_key(name): s for s in SAMPLERS.values() for name in (s.id, s.label)}


def sampler_names() -> list[str]:
    """Every accepted name: web-UI labels and short ids."""
    return [f"{s.label} ({s.id})" for s in SAMPLERS.values()]


def resolve_sampler(name: str) -> Sampler:
    """The sampler for a web-UI label ("DPM++ 2M Karras") or short id (`dpmpp_2m_karras`)."""
    sampler = _BY_NAME.get(_key(str(name)))
    if sampler is None:
        raise UserError("Unknown sampler.", expected="one of " + ", ".join(sampler_names()),
                        got=repr(name), fix="pick a name from `sdrun samplers`")
    return sampler


def _check_steps(sampler: Sampler, steps, train_steps: int) -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool)
            and sampler.min_steps <= steps <= train_steps):
        raise UserError(f"Too few or too many sampling steps for {sampler.label}.",
                        expected=f"an integer from {sampler.min_steps} to {train_steps}"
                                 + _order_note(sampler),
                        got=repr(steps), fix="choose a step count such as 20")


def _order_note(sampler: Sampler) -> str:
    if sampler.min_steps == 1:
        return ""
    return f" ({sampler.label} needs {sampler.min_steps} steps for its order)"


def _check_karras(sampler: Sampler, karras: bool | None) -> bool:
    if karras is None:
        return sampler.karras
    if karras and not sampler.has_sigmas:
        offered = ", ".join(s.label for s in SAMPLERS.values() if s.has_sigmas and not s.karras)
        raise UserError(f"{sampler.label} has no noise levels to space as Karras sigmas.",
                        expected=f"--karras with one of {offered}", got=sampler.label,
                        fix="drop --karras, or pick a sampler that offers it")
    return bool(karras)


def _check_eta(sampler: Sampler, eta: float | None) -> float:
    if eta is None:
        return 0.0
    if sampler.id != "ddim":
        raise UserError(f"{sampler.label} takes no eta.", expected="eta only with DDIM",
                        got=repr(eta), fix="drop eta, or use DDIM")
    if not 0.0 <= eta <= 1.0:
        raise UserError("Invalid DDIM eta.", expected="a number from 0 (deterministic) to 1",
                        got=repr(eta), fix="use 0.0, the usual choice")
    return float(eta)


def img2img_first_step(steps: int, strength: float) -> int:
    """diffusers' img2img: the last init_timestep = min(int(steps·strength), steps) steps run, from
    t_start = steps - init_timestep (ldm's t_enc = int(strength·steps) for DDIM is the same count)."""
    if not 0.0 < strength <= 1.0:
        raise UserError("Invalid img2img strength.",
                        expected="a number in (0, 1]: how much of the input image is re-noised",
                        got=repr(strength), fix="use e.g. 0.75 (SD1 default) or 0.8 (SD2 default)")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise UserError(f"img2img strength {strength:g} with {steps} steps leaves no step to run.",
                        expected=f"strength · steps >= 1 (strength >= {1 / steps:g} at {steps} steps)",
                        got=f"int({strength:g} · {steps}) = 0", fix="raise --strength or --steps")
    return steps - kept


def make_plan(name: str | Sampler, schedule: DDPMSchedule, parameterization: Parameterization,
              steps: int, **options) -> Plan:
    """The plan for `steps` steps; options as `make_program`'s."""
    sampler = name if isinstance(name, Sampler) else resolve_sampler(name)
    return build_plan(sampler.id, make_program(sampler, schedule, parameterization, steps,
                                               **options))


def make_program(name: str | Sampler, schedule: DDPMSchedule, parameterization: Parameterization,
                 steps: int, *, karras: bool | None = None, spacing: str | Spacing | None = None,
                 eta: float | None = None, guidance: float | None = None,
                 strength: float | None = None) -> Program:
    """The sampler's evaluations for `steps` steps; options None mean the sampler's defaults.

    `strength`: an img2img program, the steps diffusers' img2img runs at that strength, started
    from the encoded image noised to the first of them (`Program.x0_scale`).
    """
    sampler = name if isinstance(name, Sampler) else resolve_sampler(name)
    _check_steps(sampler, steps, schedule.timesteps)
    options = dict(karras=_check_karras(sampler, karras), eta=_check_eta(sampler, eta),
                   spacing=parse_spacing(spacing) or sampler.default_spacing)
    if strength is not None:
        options["start"] = img2img_first_step(steps, strength)
    if sampler.id == "lcm":
        options["guidance"] = guidance
    return sampler.build(schedule, parameterization, steps, **options)
