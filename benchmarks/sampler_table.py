"""The pipeline scope's sampler table and convergence run.

Sampler table: every sampler in `sdrun.samplers.SAMPLERS` at the bench's step count, on the first
prompt and its initial noise, on each graph backend's step-fused UNet (the one graph that serves
every sampler) and on eager PyTorch's plain UNet (the reference). To keep the run short, ONNX Runtime fp32 (`TIMED`) makes
`sampler_repeats` timed runs per sampler, in rounds over the samplers; every other engine set one run,
whose latency is reported as a single sample. Runtimes take turns, as in `benchmarks.txt2img`. The
first run's images and latents are compared with eager fp32 under the same sampler and gated with the
DDIM variants' gate (`sdrun.gates.pipeline_image_gate`); no untimed warm-up, since the DDIM variants
ran on the same sessions just before.

Convergence: `benchmarks.convergence` on ONNX Runtime fp32's plain UNet, same prompt, noise and guidance.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import accuracy
from benchmarks.config import REFERENCE, BenchConfig, Denoise, EngineSet
from benchmarks.convergence import ConvergenceResult, Problem, TARGET_SAMPLER, convergence_curves
from benchmarks.latency import Stats, interleaved
from benchmarks.outcome import SamplerResult
from benchmarks.txt2img import generation_requests, load_pipeline
from sdrun.samplers import SAMPLERS
from sdrun.sampling import guided_model

SOLVER = EngineSet("onnxruntime", "fp32")  # the convergence run's model
TIMED = EngineSet("onnxruntime", "fp32")  # the engine set timed over `sampler_repeats` runs per sampler


@dataclasses.dataclass(frozen=True)
class SamplerOutcome:
    results: tuple[SamplerResult, ...]
    convergence: ConvergenceResult | None


def sampler_benchmark(config: BenchConfig, recipe, bundles: dict[str, Path], engine_sets: list[EngineSet],
                      log: Callable[[str], None]) -> SamplerOutcome:
    """The sampler table (unless `sampler_repeats` is 0) and the convergence curves (unless no step counts)."""
    request = generation_requests(config, recipe)[0]
    loaded = {e: load_pipeline(bundles[e.precision], e, Denoise.PLAIN if e.is_reference else Denoise.STEP_FUSED,
                               config.threads) for e in engine_sets}
    results = ()
    if config.sampler_repeats:
        log(f"sampler table: {len(SAMPLERS)} samplers × {len(loaded)} engine sets at {request.steps} steps, "
            f"{config.sampler_repeats} timed runs each on {TIMED.label}, one on the others")
        runs = sampler_runs(loaded, request, config.sampler_repeats)
        results = tuple(sampler_result(e, s, runs[e, s], runs[REFERENCE, s], log) for s in SAMPLERS for e in loaded)
    convergence = None
    if config.convergence_steps:
        convergence = convergence_run(load_pipeline(bundles[SOLVER.precision], SOLVER, Denoise.PLAIN, config.threads),
                                      request, recipe, config, log)
    return SamplerOutcome(results, convergence)


def sampler_runs(loaded: dict, request, repeats: int) -> dict[tuple[EngineSet, str], list]:
    """(engine set, sampler id) -> the GenerationResult of each timed round (`repeats` on TIMED, else one)."""
    runs = {}
    for engines, one in loaded.items():
        calls = {(engines, s): functools.partial(one.pipeline.generate, dataclasses.replace(request, sampler=s))
                 for s in SAMPLERS}
        runs.update(interleaved(calls, 0, repeats if engines == TIMED else 1))
    return runs


def sampler_result(engines: EngineSet, sampler: str, runs: list, reference: list, log) -> SamplerResult:
    first, ref = runs[0], reference[0]
    latents = accuracy.latent_statistics(ref.latents, first.latents)
    image = accuracy.image_statistics(accuracy.uint8_to_unit(ref.images), accuracy.uint8_to_unit(first.images))
    label = SAMPLERS[sampler].label
    gate = None if engines.is_reference else accuracy.image_gate(f"{engines.label} {label} image",
                                                                 engines.precision, image)
    latency = Stats.of([r.timer.seconds["total"] for r in runs])
    log(f"{engines.label} {label}: {latency.median_ms:.1f} ms per image, image PSNR {image['psnr_db']:.1f} dB")
    evaluations = first.timer.counts.get("graph:unet_step") or first.timer.counts["graph:unet"]
    return SamplerResult(sampler, label, engines, evaluations, latency, latents, image, gate)


def convergence_run(loaded, request, recipe, config: BenchConfig, log=lambda line: None,
                    samplers: tuple[str, ...] = tuple(SAMPLERS)) -> ConvergenceResult:
    """Each sampler's distance to DDIM at `convergence_target_steps`, on this pipeline's plain UNet."""
    request = loaded.pipeline.complete(request)
    conditioning, _ = loaded.pipeline.conditioning([request])
    problem = Problem(guided_model(loaded.runners["unet"], conditioning, request.guidance), recipe.schedule,
                      recipe.parameterization, request.guidance, np.asarray(request.init_noise), config.seed)
    log(f"convergence: every sampler at {', '.join(map(str, config.convergence_steps))} steps against "
        f"{TARGET_SAMPLER.upper()} at {config.convergence_target_steps} steps ({SOLVER.label} plain UNet)")
    curves = convergence_curves(problem, samplers, config.convergence_steps,
                                config.convergence_target_steps, log)
    return ConvergenceResult(f"{SOLVER.label} plain UNet",
                             f"{TARGET_SAMPLER.upper()}, {config.convergence_target_steps} steps", curves)
