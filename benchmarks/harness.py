"""The benchmark: the same prompts and initial noise on every backend, eager PyTorch fp32 as the reference.

`run_benchmark` exports the recipe with random weights (one `sdcompile export` process per
precision, timed, with its peak memory), finds the backends this machine has, and runs one scope:
- PIPELINE (`benchmarks.txt2img`): txt2img end to end on each backend × precision × (plain,
  step-fused) UNet, accuracy per component and end to end, latency per stage, and diffusers'
  pipeline on the same weights as the peer baseline; then (`benchmarks.sampler_table`) every sampler
  on each graph backend's step-fused UNet, and each sampler's convergence to a 1000-step DDIM solution;
- UNET_STEP (`benchmarks.unet_step`): one UNet call at guidance batch 2 on eager, each graph runtime
  and the diffusers UNet, for full-size architectures.

A backend that is not on this machine (TensorRT not installed, or no GPU) is "not run", with the
reason. One that is present but fails (TensorRT installed and a GPU there, but unusable, or an
engine that does not build or run) stops the benchmark with `BackendFailure`: a failure, never skipped.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.config import PRECISIONS, REFERENCE, BenchConfig, EngineSet, Scope
from benchmarks.exports import ExportMeasurement, export_measured
from benchmarks.outcome import BenchResult
from benchmarks.sampler_table import sampler_benchmark
from benchmarks.txt2img import txt2img_benchmark
from benchmarks.unet_step import unet_step_benchmark

SCOPE_COMPONENTS = {Scope.PIPELINE: ("all",), Scope.UNET_STEP: ("unet",)}


class BackendFailure(Exception):
    """A backend this machine has failed to load, build or run; the message says which and why."""


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Export (or take) the bundles, run the configured scope, return every measurement."""
    from sdcompile.recipes import load_recipe

    recipe = load_recipe(config.recipe)
    set_torch_threads(config.threads)
    engine_sets, skipped = available_engine_sets()
    components = SCOPE_COMPONENTS[config.scope]
    steps = config.steps or recipe.default_steps
    with tempfile.TemporaryDirectory(prefix="sdcompile-bench-") as scratch:
        bundles, exports = prepare_bundles(config, Path(scratch), components, log)
        build_tensorrt_engines(engine_sets, bundles, components, log)
        common = dict(config=config, steps=steps, guidance=recipe.default_guidance, height=recipe.default_height,
                      width=recipe.default_width, exports=exports)
        if config.scope is Scope.UNET_STEP:
            measured = unet_step_benchmark(config, recipe, bundles, engine_sets, log)
            return BenchResult(**common, unet_step=measured, skipped=tuple(skipped))
        outcome = txt2img_benchmark(config, recipe, bundles, engine_sets, log)
        by_sampler = sampler_benchmark(config, recipe, bundles, engine_sets, log)
    return BenchResult(**common, components=outcome.components, variants=outcome.variants, peer=outcome.peer,
                       samplers=by_sampler.results, convergence=by_sampler.convergence,
                       skipped=tuple(skipped) + outcome.skipped, reference_images=outcome.reference.images)


def set_torch_threads(threads: int | None) -> None:
    """Give eager PyTorch (our reference and the diffusers peer) the same intra-op threads as ONNX Runtime."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def available_engine_sets() -> tuple[list[EngineSet], list[str]]:
    """Eager fp32 and ONNX Runtime fp32/fp16 always; TensorRT fp32/fp16 where it and a GPU are present.

    TensorRT installed beside a GPU but unusable (e.g. CUDA Python built for a newer CUDA than the
    driver) raises BackendFailure.
    """
    sets = [REFERENCE, EngineSet("onnxruntime", "fp32"), EngineSet("onnxruntime", "fp16")]
    skipped = ["torch fp16: not run: the reference is eager fp32 on the CPU (sdrun --backend torch --device cuda "
               "--dtype fp16 runs eager fp16 on a GPU; benchmarks/gpu_check.py times it)"]
    state, reason = tensorrt_status()
    if state == "usable":
        sets += [EngineSet("tensorrt", precision) for precision in PRECISIONS]
    elif state == "absent":
        skipped.append(f"tensorrt: not run: {reason}")
    else:
        raise BackendFailure(f"tensorrt: installed beside a GPU but unusable: {reason}")
    return sets, skipped


def tensorrt_status() -> tuple[str, str]:
    """("usable", description), ("absent", why: not installed or no GPU) or ("failing", why)."""
    from sdrun.backends.tensorrt import probe_tensorrt, tensorrt_available

    available, reason = tensorrt_available()
    if available:
        return "usable", reason
    return ("failing" if probe_tensorrt().present else "absent"), reason


def prepare_bundles(config: BenchConfig, scratch: Path, components: tuple[str, ...],
                    log) -> tuple[dict[str, Path], tuple[ExportMeasurement, ...]]:
    """The given bundles, or fresh exports (one child process each, timed) under `scratch`."""
    if config.bundles is not None:
        return {p: Path(config.bundles[p]) for p in PRECISIONS}, ()
    exports, bundles = [], {}
    for precision in PRECISIONS:
        bundles[precision] = scratch / f"{config.recipe}-{precision}"
        exports.append(export_measured(config.recipe, precision, bundles[precision], config.seed, components, log))
        peak = exports[-1].peak_rss_mib
        log(f"export {precision}: {exports[-1].seconds:.1f} s" + (f", peak RSS {peak:.0f} MiB" if peak else ""))
    return bundles, tuple(exports)


def build_tensorrt_engines(engine_sets: list[EngineSet], bundles: dict[str, Path], components: tuple[str, ...],
                           log) -> None:
    """Engines inside each bundle for the TensorRT engine sets, each component run once after its build;
    a build or a run that fails raises BackendFailure naming the engine set and the error."""
    for engines in [e for e in engine_sets if e.backend == "tensorrt"]:
        from sdcompile.trt import BuildOptions, BuildRequest, build_engines

        start = time.perf_counter()
        try:
            manifest = build_engines(BuildRequest(bundles[engines.precision], components, BuildOptions()), log=log)
        except Exception as err:  # noqa: BLE001 - reported with its cause: the benchmark fails
            raise BackendFailure(f"{engines.label}: engine build failed: {err}") from err
        log(f"{engines.label}: engines built in {time.perf_counter() - start:.1f} s")
        run_each_component_once(engines, bundles[engines.precision], list(manifest.components)
                                if "all" in components else list(components))


def run_each_component_once(engines: EngineSet, bundle: Path, components: list[str]) -> None:
    """Load the engine set and run every component once at its opt shapes; a failure raises BackendFailure."""
    from benchmarks.gpu_check import sample_feeds
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle

    try:
        opened = open_bundle(bundle, lambda manifest: components)
        runners = make_runners(engines.backend, opened, components)
        for name, runner in runners.items():
            record = opened.component(name)
            shapes = {n: levels["opt"] for n, levels in record.profile.items()}
            runner.run(sample_feeds(record, shapes, opened.recipe.text_encoder.vocab_size, np.random.default_rng(0)))
    except Exception as err:  # noqa: BLE001 - reported with its cause: the benchmark fails
        raise BackendFailure(f"{engines.label}: loading or running its engines failed: {err}") from err
