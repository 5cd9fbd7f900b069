"""Results as JSON and a markdown summary, named after the machine and the recipe.

Targets are reported, never asserted: they state what the project aims for on full-size models.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from benchmarks import provenance
from benchmarks.config import Scope
from benchmarks.outcome import BenchResult

OVERHEAD_TARGET = 0.02  # runtime overhead (total − time in graph calls) / end-to-end time, at full size
PEER_SPEEDUP_TARGET = 3.0  # diffusers end to end / sdrun end to end, tiny recipe, 20 steps
ORT_STEP_RATIO_TARGET = 0.8  # ONNX Runtime fp32 UNet step / eager torch UNet step, full size
STAGES = ("text_encoder", "denoise", "vae_decoder", "overhead")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    value: float
    relation: str  # "<=" or ">="
    target: float
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.target if self.relation == "<=" else self.value >= self.target

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "met": self.met}


# --- targets ---------------------------------------------------------------------------------------------


def targets(result: BenchResult) -> list[Target]:
    if result.config.scope is Scope.UNET_STEP:
        eager = result.unet_step[0].latency.median_ms
        return [Target(f"{r.label} UNet step / eager", r.latency.median_ms / eager, "<=", ORT_STEP_RATIO_TARGET,
                       "target set for full-size models") for r in result.unet_step if r.label == "onnxruntime fp32"]
    found = [Target(f"{v.variant.label} overhead / end to end", v.latency.overhead_fraction, "<=", OVERHEAD_TARGET,
                    "target set for full-size models; tiny graphs make fixed costs loom large")
             for v in result.variants if v.variant.engines.backend != "torch"]
    if result.peer:
        peer_ms = result.peer.latency.median_ms
        found += [Target(f"diffusers / {v.variant.label} end to end", peer_ms / v.latency.stages["total"].median_ms,
                         ">=", PEER_SPEEDUP_TARGET, f"{result.steps} steps")
                  for v in result.variants if v.variant.engines.backend != "torch"]
    return found


# --- JSON ------------------------------------------------------------------------------------------------


def result_dict(result: BenchResult, stamp: dict) -> dict:
    config = result.config
    return {
        "provenance": stamp, "recipe": config.recipe, "scope": config.scope.value, "steps": result.steps,
        "guidance": result.guidance, "height": result.height, "width": result.width, "repeats": config.repeats,
        "warmup": config.warmup, "seed": config.seed, "threads": config.threads, "prompts": list(config.prompts),
        "negative_prompt": config.negative_prompt,
        "exports": [e.to_dict() for e in result.exports],
        "components": [c.to_dict() for c in result.components],
        "variants": [v.to_dict() for v in result.variants],
        "peer": result.peer.to_dict() if result.peer else None,
        "unet_step": [u.to_dict() for u in result.unet_step],
        "samplers": [r.to_dict() for r in result.samplers],
        "convergence": result.convergence.to_dict() if result.convergence else None,
        "targets": [t.to_dict() for t in targets(result)],
        "gates": [g.to_dict() for g in result.gates],
        "passed": not result.failed_gates,
        "skipped": list(result.skipped),
    }


# --- markdown --------------------------------------------------------------------------------------------


def markdown(result: BenchResult, stamp: dict) -> str:
    config = result.config
    machine = stamp["machine"]
    workload = (f"{result.steps} DDIM steps, guidance {result.guidance:g}, {result.width}×{result.height}"
                if config.scope is Scope.PIPELINE else
                f"one UNet call at the first timestep of a {result.steps}-step schedule, "
                f"{result.width}×{result.height}")
    head = [f"# sdcompile benchmark: {config.recipe}, {config.scope.value}",
            "",
            f"Machine `{machine['slug']}`: {machine['cpu']}, {machine['cores']} cores, "
            + (f"{config.threads} intra-op thread(s) per runtime." if config.threads else "default thread pools."),
            f"{workload}, random weights seed {config.seed}; median and p90 of {config.repeats} runs after "
            f"{config.warmup} warm-up. Reference: eager PyTorch fp32 (plain UNet)."]
    sections = ["## Provenance\n\n" + "\n".join(provenance.summary_lines(stamp)), exports_table(result)]
    if config.scope is Scope.PIPELINE:
        sections += [variants_table(result), memory_table(result), components_table(result), peer_table(result),
                     samplers_table(result), convergence_table(result.convergence)]
    else:
        sections += [unet_step_table(result)]
    sections += [targets_table(result), gates_text(result)]
    if result.skipped:
        sections.append("Skipped:\n" + "\n".join(f"- {s}" for s in result.skipped))
    return "\n\n".join(["\n".join(head), *[s for s in sections if s]]) + "\n"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def exports_table(result: BenchResult) -> str:
    if not result.exports:
        return "Exports: bundles were given, not exported in this run."
    rows = [[e.precision, f"{e.seconds:.1f}", f"{e.peak_rss_mib:.0f}" if e.peak_rss_mib else "n/a",
             ", ".join(f"{k} {v:.1f}" for k, v in e.component_seconds.items())] for e in result.exports]
    return "## Export (`sdcompile export`, one process each)\n\n" + table(
        ["precision", "wall s", "peak RSS MiB", "trace + passes per component, s"], rows)


def variants_table(result: BenchResult) -> str:
    peer_ms = result.peer.latency.median_ms if result.peer else None
    rows = []
    for v in result.variants:
        s = v.latency.stages
        rows.append([v.variant.label, f"{v.load_seconds:.2f}",
                     f"{s['total'].median_ms:.1f} / {s['total'].p90_ms:.1f}", f"{s['step'].median_ms:.2f}",
                     *(f"{s[stage].median_ms:.1f}" for stage in STAGES),
                     f"{v.latency.overhead_fraction:.1%}",
                     f"{peer_ms / s['total'].median_ms:.2f}×" if peer_ms else "n/a",
                     f"{v.image['max_abs'] * 255:.0f}/255", _db(v.image["psnr_db"]), f"{v.image['ssim']:.4f}",
                     f"{v.latents['rel_l2']:.2e}", _verdict(v.gate)])
    return "## End to end\n\nTimes in ms (stage columns: time inside that stage's graph calls).\n\n" + table(
        ["variant", "load s", "total med / p90", "per step", "text enc", "denoise", "VAE", "overhead",
         "overhead %", "vs diffusers", "image max abs", "PSNR dB", "SSIM", "latents rel L2", "gate"], rows)


def memory_table(result: BenchResult) -> str:
    stages = list(dict.fromkeys(stage for v in result.variants for stage in v.memory))
    if not stages:
        return ""
    rows = [[v.variant.label, *(f"{v.memory[s]:.3f}" if s in v.memory else "n/a" for s in stages)]
            for v in result.variants]
    return ("## Peak resident memory\n\nHost GiB while each stage ran (the process's peak restarted before it; "
            "every variant is loaded in the one benchmark process).\n\n" + table(["variant", *stages], rows))


def components_table(result: BenchResult) -> str:
    rows = [[c.engines.label, c.component, f"{c.latency.median_ms:.2f} / {c.latency.p90_ms:.2f}",
             f"{c.statistics['max_abs']:.2e}", f"{c.statistics['rel_l2']:.2e}", f"{c.statistics['cosine']:.6f}",
             _db(c.statistics["psnr_db"]), _verdict(c.gate)] for c in result.components]
    return "## Per component (one call on the same inputs)\n\n" + table(
        ["engines", "component", "ms med / p90", "max abs", "rel L2", "cosine", "PSNR dB", "gate"], rows)


def peer_table(result: BenchResult) -> str:
    if not result.peer:
        return ""
    p = result.peer
    row = [f"{p.build_seconds:.1f}", f"{p.latency.median_ms:.1f} / {p.latency.p90_ms:.1f}",
           f"{p.image['max_abs']:.2e}", _db(p.image["psnr_db"]), f"{p.image['ssim']:.6f}", _verdict(p.gate)]
    return (f"## Peer: {p.name}, eager fp32, same weights\n\n"
            "Image accuracy on float images in [-1, 1] before quantisation.\n\n"
            + table(["build s (imports included)", "total ms med / p90", "image max abs", "PSNR dB", "SSIM",
                     "gate"], [row]))


def samplers_table(result: BenchResult) -> str:
    if not result.samplers:
        return ""
    rows = [[r.label, r.engines.label, str(r.evaluations), str(r.latency.samples),
             f"{r.latency.median_ms:.1f} / {r.latency.p90_ms:.1f}",
             f"{r.image['max_abs'] * 255:.0f}/255", _db(r.image["psnr_db"]), f"{r.latents['rel_l2']:.2e}",
             _verdict(r.gate)] for r in result.samplers]
    return (f"## Samplers, {result.steps} steps, step-fused UNet (eager reference: plain)\n\nMilliseconds per image (first prompt), median / p90 "
            "of the runs counted (ONNX Runtime fp32 is timed over several; the others run once, for the gate); "
            "accuracy against eager fp32 with the same sampler and noise.\n\n"
            + table(["sampler", "engines", "UNet calls", "runs", "ms med / p90", "image max abs", "PSNR dB",
                     "latents rel L2", "gate"], rows))


def convergence_table(convergence) -> str:
    """Relative L2 of each sampler's final latents to the target solution, one column per step count."""
    if convergence is None or not convergence.curves:
        return ""
    steps = convergence.curves[0].steps
    rows = [[c.label + (" (stochastic)" if c.stochastic else ""), *(f"{d:.2e}" for d in c.distances)]
            for c in convergence.curves]
    return (f"## Convergence to {convergence.target} ({convergence.model})\n\n"
            "Relative L2 of the final latents to the target's, same prompt, initial noise and guidance. "
            "Stochastic samplers draw fresh noise each step and converge to another distribution, "
            "not to this ODE solution. DDIM and PLMS keep ldm's discretization, whose first timestep lies "
            "below 999 (951 at 20 steps), so they start from a slightly different point of the ODE and level "
            "off.\n\n" + table(["sampler", *(f"{n} steps" for n in steps)], rows))


def unet_step_table(result: BenchResult) -> str:
    eager = result.unet_step[0].latency.median_ms
    rows = [[r.label, f"{r.load_seconds:.1f}", f"{r.latency.median_ms:.1f} / {r.latency.p90_ms:.1f}",
             f"{r.latency.median_ms / eager:.2f}×", f"{r.statistics['max_abs']:.2e}", f"{r.statistics['rel_l2']:.2e}",
             f"{r.statistics['cosine']:.6f}", _verdict(r.gate)] for r in result.unet_step]
    return ("## One UNet step, batch 2 (guidance)\n\n"
            + table(["runner", "load s", "ms med / p90", "vs eager", "max abs", "rel L2", "cosine", "gate"], rows))


def targets_table(result: BenchResult) -> str:
    rows = [[t.name, f"{t.value:.3g}", f"{t.relation} {t.target:g}", "met" if t.met else "not met", t.note]
            for t in targets(result)]
    return "## Targets (reported, not asserted)\n\n" + table(["target", "measured", "aim", "", "note"], rows) \
        if rows else ""


def gates_text(result: BenchResult) -> str:
    failed = result.failed_gates
    if not failed:
        return f"All {len(result.gates)} accuracy gates passed."
    return f"{len(failed)} of {len(result.gates)} accuracy gates FAILED:\n" + "\n".join(
        f"- {g.describe()}" for g in failed)


def _db(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


def _verdict(gate) -> str:
    if gate is None:
        return "reference"
    return "pass" if gate.passed else f"FAIL (needs {gate.relation} {gate.value:.3g})"


# --- files -----------------------------------------------------------------------------------------------


def write_results(result: BenchResult, out: Path, started: provenance.Started, log=print) -> dict[str, Path]:
    """JSON, markdown and PNGs (latency, images, convergence) under `out`, named
    `<machine>-<recipe>[-unet-step]`, each stamped with the provenance of the run that began at
    `started`; returns the paths."""
    from benchmarks import charts
    from sdrun.bundle import write_json_atomic

    stamp = provenance.finished(started, result.config.threads)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stamp['machine']['slug']}-{result.config.recipe}"
    if result.config.scope is Scope.UNET_STEP:
        stem += "-unet-step"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "chart": out / f"{stem}-latency.png"}
    write_json_atomic(paths["json"], finite_json(result_dict(result, stamp)))
    paths["markdown"].write_text(markdown(result, stamp))
    charts.latency_chart(result, paths["chart"])
    if result.config.scope is Scope.PIPELINE:
        paths["images"] = out / f"{stem}-images.png"
        charts.image_grid(result, paths["images"])
    if result.convergence:
        paths["convergence"] = out / f"{stem}-convergence.png"
        title = f"{result.config.recipe}: distance to {result.convergence.target}"
        charts.convergence_chart(result.convergence, title, paths["convergence"])
    for kind, path in paths.items():
        if path.suffix == ".png":
            provenance.stamp_png(path, stamp)
        log(f"wrote {kind}: {path}")
    return paths


def finite_json(value):
    """Strict JSON: non-finite floats (PSNR of identical arrays) become null."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
