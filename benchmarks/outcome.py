"""Everything a benchmark run measured, as frozen records that turn into JSON."""
from __future__ import annotations

import dataclasses

import numpy as np

from sdrun.gates import Verdict
from benchmarks.config import BenchConfig, EngineSet, Variant
from benchmarks.convergence import ConvergenceResult
from benchmarks.exports import ExportMeasurement
from benchmarks.latency import PipelineLatency, Stats


@dataclasses.dataclass(frozen=True)
class ComponentResult:
    engines: EngineSet
    component: str
    statistics: dict
    latency: Stats
    gate: Verdict | None  # None for the reference itself

    def to_dict(self) -> dict:
        return {"backend": self.engines.backend, "precision": self.engines.precision, "component": self.component,
                "accuracy": self.statistics, "latency": self.latency.to_dict(),
                "gate": self.gate.to_dict() if self.gate else None}


@dataclasses.dataclass(frozen=True)
class VariantResult:
    variant: Variant
    load_seconds: float
    latents: dict  # final latents vs the reference
    image: dict  # uint8 images in [0, 1] vs the reference, with SSIM
    latency: PipelineLatency
    gate: Verdict | None
    images: np.ndarray  # (P, H, W, 3) uint8, one per prompt
    memory: dict = dataclasses.field(default_factory=dict)  # stage -> peak resident host GiB (`benchmarks.memory`)

    def to_dict(self) -> dict:
        v = self.variant
        return {"label": v.label, "backend": v.engines.backend, "precision": v.engines.precision,
                "denoise": v.denoise.value, "reference": v.is_reference, "load_seconds": self.load_seconds,
                "accuracy": {"latents": self.latents, "image": self.image}, "latency": self.latency.to_dict(),
                "gate": self.gate.to_dict() if self.gate else None, "peak_resident_gib": self.memory}


@dataclasses.dataclass(frozen=True)
class PeerResult:
    build_seconds: float
    image: dict  # float images in [-1, 1] vs the reference's decoded (and clamped) images
    latency: Stats  # one end-to-end pipeline call
    gate: Verdict
    images: np.ndarray  # (P, H, W, 3) uint8
    pipeline: str = "StableDiffusionPipeline"  # the diffusers class the peer ran

    @property
    def name(self) -> str:
        return f"diffusers {self.pipeline} + DDIMScheduler"

    def to_dict(self) -> dict:
        return {"name": f"{self.name} (eager fp32)",
                "build_seconds": self.build_seconds, "accuracy": {"image": self.image},
                "latency": self.latency.to_dict(), "gate": self.gate.to_dict()}


@dataclasses.dataclass(frozen=True)
class SamplerResult:
    sampler: str  # short id
    label: str  # as the web UIs write it
    engines: EngineSet  # on its step-fused UNet (the eager reference: plain)
    evaluations: int  # UNet calls per image
    latency: Stats  # one image end to end
    latents: dict  # final latents vs eager fp32 with the same sampler
    image: dict  # uint8 images in [0, 1] vs eager fp32 with the same sampler
    gate: Verdict | None  # None for eager fp32 itself

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "label": self.label, "backend": self.engines.backend,
                "precision": self.engines.precision, "evaluations": self.evaluations,
                "latency": self.latency.to_dict(), "accuracy": {"latents": self.latents, "image": self.image},
                "gate": self.gate.to_dict() if self.gate else None}


@dataclasses.dataclass(frozen=True)
class UNetStepResult:
    label: str  # "torch fp32 (eager)", "onnxruntime fp16", "diffusers (eager)", ...
    precision: str
    load_seconds: float
    statistics: dict  # vs eager
    latency: Stats
    gate: Verdict | None

    def to_dict(self) -> dict:
        return {"label": self.label, "precision": self.precision, "load_seconds": self.load_seconds,
                "accuracy": self.statistics, "latency": self.latency.to_dict(),
                "gate": self.gate.to_dict() if self.gate else None}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    steps: int
    guidance: float
    height: int
    width: int
    exports: tuple[ExportMeasurement, ...]  # empty when the bundles were given
    components: tuple[ComponentResult, ...] = ()
    variants: tuple[VariantResult, ...] = ()
    peer: PeerResult | None = None
    unet_step: tuple[UNetStepResult, ...] = ()
    samplers: tuple[SamplerResult, ...] = ()
    convergence: ConvergenceResult | None = None
    skipped: tuple[str, ...] = ()  # what could not run here, and why
    reference_images: np.ndarray | None = None  # (P, H, W, 3) uint8

    @property
    def gates(self) -> list[Verdict]:
        found = [r.gate for r in (*self.components, *self.variants, *self.samplers, *self.unet_step) if r.gate]
        return found + ([self.peer.gate] if self.peer else [])

    @property
    def failed_gates(self) -> list[Verdict]:
        return [gate for gate in self.gates if not gate.passed]
