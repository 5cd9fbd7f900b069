"""The pipeline scope: txt2img on every variant and on the diffusers peer, same prompts and initial noise.

Every variant is loaded first; accuracy comes from one run per prompt. Latency comes from rounds in
which each variant of one runtime (and each component, and the peer with eager PyTorch) runs once, so
that load from other processes falls on all of them alike; runtimes take turns, never rounds, so the
idle threads of one runtime's pool never compete with another's work.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import accuracy, peer
from sdrun import gates
from benchmarks.config import REFERENCE, BenchConfig, Denoise, EngineSet, Variant
from benchmarks.latency import PipelineLatency, Stats, elapsed, interleaved, stage_seconds
from benchmarks.memory import LOAD, measured_load, stage_peaks
from benchmarks.outcome import ComponentResult, PeerResult, VariantResult

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_step", "vae_decoder")  # those a bundle has
BENCH_SAMPLER = "ddim"  # the peer's scheduler (`benchmarks.peer`), whatever the recipe's default


@dataclasses.dataclass(frozen=True)
class Reference:
    """The eager fp32 plain run every variant is compared with, and one call's inputs per component."""

    results: tuple  # GenerationResult per request
    feeds: dict[str, dict[str, np.ndarray]]  # component -> inputs
    outputs: dict[str, np.ndarray]  # component -> its output on `feeds`
    decoded: np.ndarray  # (P, 3, H, W) float32 VAE output of the final latents, before quantisation

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([r.images for r in self.results])


@dataclasses.dataclass(frozen=True)
class Peer:
    pipe: object  # diffusers StableDiffusionPipeline
    build_seconds: float
    images: np.ndarray  # (P, 3, H, W) float32 in [-1, 1]

    def run(self, request) -> np.ndarray:
        return run_peer_request(self.pipe, request)


def run_peer_request(pipe, request) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1]: the diffusers pipeline on a completed GenerationRequest."""
    return peer.run_peer(pipe, request.prompt, request.negative_prompt, request.steps, request.guidance,
                         request.init_noise, request.height, request.width)


@dataclasses.dataclass(frozen=True)
class Txt2ImgOutcome:
    reference: Reference
    components: tuple[ComponentResult, ...]
    variants: tuple[VariantResult, ...]
    peer: PeerResult | None
    skipped: tuple[str, ...]


def txt2img_benchmark(config: BenchConfig, recipe, bundles: dict[str, Path], engine_sets: list[EngineSet],
                      log: Callable[[str], None]) -> Txt2ImgOutcome:
    requests = generation_requests(config, recipe)
    load_peaks = {}
    loaded = {engines: {d: _load_measured(bundles[engines.precision], engines, d, config.threads, load_peaks)
                        for d in Denoise} for engines in engine_sets}
    log(f"loaded {len(loaded) * len(Denoise)} pipelines; reference run ({REFERENCE.label} plain)")
    reference = reference_run(loaded[REFERENCE], requests)
    outputs = {engines: run_components(pipelines, reference.feeds) for engines, pipelines in loaded.items()}
    runs = {Variant(e, d): tuple(p.pipeline.generate(r) for r in requests) for e, ps in loaded.items()
            for d, p in ps.items()}
    found_peer, skipped = build_peer(config, recipe, requests, log)
    log(f"timing: {config.warmup} warm-up and {config.repeats} timed rounds over every component, then every "
        "variant" + (" and the peer" if found_peer else ""))
    component_seconds = by_runtime(component_calls(loaded, reference.feeds), config)
    stage_runs = by_runtime(pipeline_calls(loaded, requests[0], found_peer), config)
    steps = requests[0].steps
    components = tuple(component_result(e, name, reference.outputs[name], outputs[e][name],
                                        Stats.of(component_seconds[e, name]), log)
                       for e in loaded for name in component_runners(loaded[e]))
    memory = {v: {LOAD: load_peaks[v], **stage_peaks(loaded[v.engines][v.denoise].pipeline, requests[0])}
              for v in runs}
    variants = tuple(variant_result(v, loaded[v.engines][v.denoise].load_seconds, results, reference,
                                    PipelineLatency.of(stage_runs[v], steps), log, memory[v])
                     for v, results in runs.items())
    peer_outcome = peer_result(found_peer, reference, Stats.of([r["total"] for r in stage_runs["peer"]]), log) \
        if found_peer else None
    return Txt2ImgOutcome(reference, components, variants, peer_outcome, skipped)


def generation_requests(config: BenchConfig, recipe) -> tuple:
    """One request per prompt with its initial noise, drawn in turn from one seeded generator."""
    from sdrun.pipeline import GenerationRequest

    rng = np.random.default_rng(config.seed)
    shape = (1, recipe.unet.in_channels, recipe.default_height // recipe.vae_scale,
             recipe.default_width // recipe.vae_scale)
    return tuple(GenerationRequest(prompt, config.negative_prompt, steps=config.steps or recipe.default_steps,
                                   guidance=recipe.default_guidance, seed=config.seed, sampler=BENCH_SAMPLER,
                                   height=recipe.default_height, width=recipe.default_width,
                                   init_noise=rng.standard_normal(shape, dtype=np.float32))
                 for prompt in config.prompts)


def load_pipeline(bundle: Path, engines: EngineSet, denoise: Denoise, threads: int | None):
    """A loaded pipeline with the plain or the step-fused UNet (`load_seconds`: time to make the runners)."""
    from sdrun.backends import BackendOptions
    from sdrun.session import load_pipeline as load

    return load(bundle, engines.backend, step_fusion=denoise is Denoise.STEP_FUSED,
                options=BackendOptions(threads=threads))


def _load_measured(bundle: Path, engines: EngineSet, denoise: Denoise, threads: int | None, peaks: dict):
    """`load_pipeline`, its peak resident GiB recorded in `peaks` under its variant."""
    loaded, peaks[Variant(engines, denoise)] = measured_load(lambda: load_pipeline(bundle, engines, denoise, threads))
    return loaded


def reference_run(pipelines: dict, requests: tuple) -> Reference:
    plain = pipelines[Denoise.PLAIN].pipeline
    results = tuple(plain.generate(r) for r in requests)
    feeds = component_feeds(pipelines[Denoise.PLAIN], results[0])
    decoded = np.concatenate([r.decoded for r in results])
    return Reference(results, feeds, run_components(pipelines, feeds), decoded)


def component_feeds(loaded, result) -> dict[str, dict[str, np.ndarray]]:
    """One call's inputs per component, from a reference run: its prompts' token ids; its initial noise at
    the first evaluation of its sampler with the reference's text embeddings; its final latents."""
    from sdrun.sampling import draw_noises, step_feeds

    request = result.request
    tokens = loaded.pipeline.text_tokens([request.negative_prompt, request.prompt])
    conditioning, _ = loaded.pipeline.conditioning([request])
    noise = request.init_noise
    plan = loaded.pipeline.sampler_plan(request)
    steps = step_feeds(plan, noise, conditioning, request.guidance,
                       draw_noises(plan, noise.shape, np.random.default_rng(0)))
    return {
        **{name: {"input_ids": t.ids} for name, t in tokens.items()},
        "unet": {"sample": np.concatenate([noise, noise]), "timestep": steps.rows["timestep"][0], **conditioning},
        "unet_step": {"state": steps.state, **steps.conditioning, **steps.evaluation(0)},
        "vae_decoder": {"latent": result.latents},
    }


def component_runners(pipelines: dict) -> dict:
    """Every component the two pipelines of an engine set loaded (plain: `unet`, step-fused: `unet_step`)."""
    runners = {}
    for loaded in pipelines.values():
        runners.update(loaded.runners)
    return {name: runners[name] for name in COMPONENTS if name in runners}


def run_components(pipelines: dict, feeds: dict) -> dict[str, np.ndarray]:
    """Each component's single output on its feeds (copied: runners may reuse their output buffers)."""
    return {name: next(iter(runner.run(feeds[name]).values())).copy()
            for name, runner in component_runners(pipelines).items()}


def by_runtime(calls: dict, config: BenchConfig) -> dict:
    """`interleaved` rounds over the calls of one runtime at a time (the peer runs on eager PyTorch)."""
    runtimes = {key: runtime_of(key) for key in calls}
    results = {}
    for runtime in dict.fromkeys(runtimes.values()):
        group = {key: call for key, call in calls.items() if runtimes[key] == runtime}
        results.update(interleaved(group, config.warmup, config.repeats))
    return results


def runtime_of(key) -> str:
    """The backend behind a call key: (EngineSet, component), Variant, or "peer"."""
    if key == "peer":
        return REFERENCE.backend
    engines = key.engines if isinstance(key, Variant) else key[0]
    return engines.backend


def component_calls(loaded: dict, feeds: dict) -> dict[tuple[EngineSet, str], Callable[[], float]]:
    return {(engines, name): functools.partial(elapsed, functools.partial(runner.run, feeds[name]))
            for engines, pipelines in loaded.items() for name, runner in component_runners(pipelines).items()}


def pipeline_calls(loaded: dict, request, found_peer: Peer | None) -> dict:
    """Per variant (and "peer"): one end-to-end run returning its seconds per stage."""
    calls = {Variant(e, d): functools.partial(_stage_seconds_of, one.pipeline, request)
             for e, pipelines in loaded.items() for d, one in pipelines.items()}
    if found_peer:
        calls["peer"] = lambda: {"total": elapsed(functools.partial(found_peer.run, request))}
    return calls


def _stage_seconds_of(pipeline, request) -> dict[str, float]:
    return stage_seconds(pipeline.generate(request).timer.seconds)


def component_result(engines: EngineSet, name: str, reference: np.ndarray, output: np.ndarray, latency: Stats,
                     log) -> ComponentResult:
    stats = accuracy.component_statistics(name, reference, output)
    gate = None if engines.is_reference else accuracy.component_gate(f"{engines.label} {name}", name,
                                                                     engines.precision, stats)
    log(f"{engines.label} {name}: {latency.median_ms:.2f} ms, rel L2 {stats['rel_l2']:.3g}, "
        f"cosine {stats['cosine']:.6f}")
    return ComponentResult(engines, name, stats, latency, gate)


def variant_result(variant: Variant, load_seconds: float, results: tuple, reference: Reference,
                   latency: PipelineLatency, log, memory: dict | None = None) -> VariantResult:
    images = np.concatenate([r.images for r in results])
    latents = accuracy.latent_statistics(np.concatenate([r.latents for r in reference.results]),
                                         np.concatenate([r.latents for r in results]))
    image = accuracy.image_statistics(accuracy.uint8_to_unit(reference.images), accuracy.uint8_to_unit(images))
    gate = None if variant.is_reference else accuracy.image_gate(f"{variant.label} image",
                                                                 variant.engines.precision, image)
    log(f"{variant.label}: {latency.stages['total'].median_ms:.1f} ms end to end "
        f"({latency.overhead_fraction:.1%} outside graphs), image PSNR {image['psnr_db']:.1f} dB")
    return VariantResult(variant, load_seconds, latents, image, latency, gate, images, memory or {})


def build_peer(config: BenchConfig, recipe, requests: tuple, log) -> tuple[Peer | None, tuple[str, ...]]:
    """The diffusers pipeline on the same weights, with its images for `requests`; None when diffusers is missing."""
    from sdcompile.weights import RandomWeights, load_models
    from sdrun.errors import MissingDependencyError

    start = time.perf_counter()
    try:
        pipe = peer.diffusers_pipeline_from_models(load_models(recipe, RandomWeights(config.seed)), recipe)
    except MissingDependencyError as err:
        return None, (f"diffusers peer: {err.problem}",)
    build_seconds = time.perf_counter() - start
    log(f"diffusers peer built in {build_seconds:.1f} s")
    return Peer(pipe, build_seconds, np.concatenate([run_peer_request(pipe, r) for r in requests])), ()


def peer_result(found: Peer, reference: Reference, latency: Stats, log) -> PeerResult:
    from sdrun.pipeline import to_uint8

    stats = accuracy.image_statistics(np.clip(reference.decoded, -1.0, 1.0), found.images, gates.DECODED_RANGE)
    log(f"diffusers peer: {latency.median_ms:.1f} ms end to end, image max abs {stats['max_abs']:.3g}")
    return PeerResult(found.build_seconds, stats, latency, accuracy.peer_gate("diffusers peer image", stats),
                      to_uint8(found.images), type(found.pipe).__name__)
