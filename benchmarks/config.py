"""What a benchmark run measures: recipe, scope, repetitions, and the variants it compares."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path

from benchmarks.convergence import STEP_COUNTS, TARGET_STEPS

DEFAULT_PROMPTS = ("a lighthouse on a cliff at dawn", "a bowl of fruit on a wooden table, oil painting")
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality"
PRECISIONS = ("fp32", "fp16")


class Scope(enum.Enum):
    PIPELINE = "pipeline"  # txt2img end to end, every component compared
    UNET_STEP = "unet-step"  # one UNet call at guidance batch 2 (for full-size architectures)


class Denoise(enum.Enum):
    PLAIN = "plain"  # UNet graph, then guidance and the sampler update on the host
    STEP_FUSED = "step-fused"  # one graph per model evaluation: UNet, guidance and the sampler update


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    recipe: str = "tiny"
    scope: Scope = Scope.PIPELINE
    steps: int | None = None  # None: the recipe's default
    repeats: int = 5
    warmup: int = 1
    seed: int = 0  # random weights and initial noise
    threads: int | None = None  # intra-op threads of ONNX Runtime and torch; None: their defaults
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    sampler_repeats: int = 3  # timed runs per (backend, sampler) in the sampler table; 0: no sampler table
    convergence_steps: tuple[int, ...] = STEP_COUNTS  # empty: no convergence run
    convergence_target_steps: int = TARGET_STEPS  # the DDIM solution the curves converge to
    # precision -> an existing bundle of `recipe` exported from RandomWeights(seed); None: export anew
    bundles: Mapping[str, Path] | None = None


@dataclasses.dataclass(frozen=True)
class EngineSet:
    """One backend at one precision: the graphs every variant on it runs."""

    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def is_reference(self) -> bool:
        return self == REFERENCE


REFERENCE = EngineSet("torch", "fp32")  # eager PyTorch: what every other backend is measured against


@dataclasses.dataclass(frozen=True)
class Variant:
    engines: EngineSet
    denoise: Denoise

    @property
    def label(self) -> str:
        return f"{self.engines.label} {self.denoise.value}"

    @property
    def is_reference(self) -> bool:
        return self.engines.is_reference and self.denoise is Denoise.PLAIN


@dataclasses.dataclass(frozen=True)
class ExportBenchConfig:
    """The export-memory benchmark: one `sdcompile export` process per (precision, component)."""

    recipe: str = "tiny"
    seed: int = 0  # random weights
    components: tuple[str, ...] | None = None  # base components and/or "all"; None: every base component and all
    precisions: tuple[str, ...] = PRECISIONS
