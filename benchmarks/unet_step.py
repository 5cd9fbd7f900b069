"""The UNet-step scope: one UNet call at classifier-free-guidance batch 2 on every runner, same inputs.

Meant for full-size architectures, where a whole txt2img run per variant takes too long on a CPU:
eager PyTorch first (its output is the reference), then the diffusers UNet on the same weights,
then each graph runtime. Each runner is released before the next loads, so memory holds at most
two copies of the UNet weights at a time.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import accuracy, peer
from benchmarks.config import REFERENCE, BenchConfig, EngineSet
from benchmarks.latency import Stats, timed_calls
from benchmarks.outcome import UNetStepResult

BATCH = 2  # one prompt with guidance: [unconditional; conditional]


def unet_step_feeds(recipe, steps: int | None, seed: int) -> dict[str, np.ndarray]:
    """The `unet` graph's inputs at the recipe's default size: N(0, 1) latents and text embeddings, and
    the first DDIM timestep of a `steps`-step schedule."""
    from sdrun.sampling import sampler_plan

    rng = np.random.default_rng(seed)
    latent = (recipe.default_height // recipe.vae_scale, recipe.default_width // recipe.vae_scale)
    first = sampler_plan(recipe, None, steps or recipe.default_steps, None, None, None, 7.5).timesteps[:1]
    context = (BATCH, recipe.text_encoder.context_length, recipe.unet.context_dim)
    return {"sample": rng.standard_normal((BATCH, recipe.unet.in_channels, *latent), dtype=np.float32),
            "timestep": first.astype(np.float32),
            "encoder_hidden_states": rng.standard_normal(context, dtype=np.float32)}


def unet_step_benchmark(config: BenchConfig, recipe, bundles: dict[str, Path], engine_sets: list[EngineSet],
                        log: Callable[[str], None]) -> tuple[UNetStepResult, ...]:
    from sdcompile.components import component_spec
    from sdcompile.weights import RandomWeights, ldm_state_dict, load_models
    from sdrun.backends.torch import TorchRunner
    from sdrun.bundle import open_bundle

    feeds = unet_step_feeds(recipe, config.steps, config.seed)
    opened = {precision: open_bundle(bundle, lambda manifest: ["unet"]) for precision, bundle in bundles.items()}
    start = time.perf_counter()
    models = load_models(recipe, RandomWeights(config.seed))
    # Built here rather than through the registry so that the peer below shares these weights.
    eager = TorchRunner(component_spec("unet", recipe).wrap(models, recipe).eval(),
                        opened[REFERENCE.precision].component("unet"))
    load_seconds = time.perf_counter() - start
    reference = eager.run(feeds)["latent"].copy()
    results = [measure(f"{REFERENCE.label} (eager)", "fp32", eager, load_seconds, feeds, reference, config, log,
                       gated=False)]
    del eager
    start = time.perf_counter()
    runner = peer.DiffusersUNetRunner(peer.diffusers_unet(ldm_state_dict(models), recipe))
    del models
    results.append(measure("diffusers (eager fp32)", "fp32", runner, time.perf_counter() - start, feeds, reference,
                           config, log))
    del runner
    for engines in [e for e in engine_sets if not e.is_reference]:
        gc.collect()
        runner, load_seconds = graph_runner(engines, opened[engines.precision], config.threads)
        results.append(measure(engines.label, engines.precision, runner, load_seconds, feeds, reference, config,
                               log))
        del runner
    return tuple(results)


def graph_runner(engines: EngineSet, bundle, threads: int | None):
    """(the opened bundle's `unet` runner on `engines.backend`, seconds to load it)."""
    from sdrun.backends import BackendOptions, make_runners

    start = time.perf_counter()
    runner = make_runners(engines.backend, bundle, ["unet"], BackendOptions(threads=threads))["unet"]
    return runner, time.perf_counter() - start


def measure(label: str, precision: str, runner, load_seconds: float, feeds: dict, reference: np.ndarray,
            config: BenchConfig, log, gated: bool = True) -> UNetStepResult:
    stats = accuracy.component_statistics("unet", reference, runner.run(feeds)["latent"])
    latency = Stats.of(timed_calls(lambda: runner.run(feeds), config.warmup, config.repeats))
    gate = accuracy.component_gate(f"{label} unet", "unet", precision, stats) if gated else None
    log(f"{label}: UNet step {latency.median_ms:.1f} ms (p90 {latency.p90_ms:.1f}), load {load_seconds:.1f} s, "
        f"rel L2 {stats['rel_l2']:.3g}")
    return UNetStepResult(label, precision, load_seconds, stats, latency, gate)
