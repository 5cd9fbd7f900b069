"""Wall-clock latency after warm-up: median and 90th percentile of repeated runs.

Every time is `time.perf_counter` around a call that returns only once its results are in host
memory, so it is what a caller waits for. Pipeline stages come from the runtime's own StageTimer:
`graph:<component>` is time inside graph calls, and the runtime overhead is the rest of `total`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

# Stacked-chart stages: which `graph:<component>` timer entries each one sums.
K = TypeVar("K")
T = TypeVar("T")
STAGE_GRAPHS = {
    "text_encoder": ("graph:text_encoder",),
    "denoise": ("graph:unet", "graph:unet_step"),
    "vae_decoder": ("graph:vae_decoder",),
}


@dataclasses.dataclass(frozen=True)
class Stats:
    median_ms: float
    p90_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        values = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(np.median(values)), float(np.percentile(values, 90)), len(values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def elapsed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def timed_calls(call: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    return interleaved({None: lambda: elapsed(call)}, warmup, repeats)[None]


def interleaved(calls: Mapping[K, Callable[[], T]], warmup: int, repeats: int) -> dict[K, list[T]]:
    """Round robin: each round makes every call once, so a burst of load from other processes falls on all
    of them alike instead of on whichever ran at the time. Returns each call's results of the timed rounds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    results = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            results[key].append(call())
    return results


def stage_seconds(timer_seconds: dict) -> dict[str, float]:
    """One generate() call's seconds per stage: graph time per stage, overhead, total, and the loop."""
    total = timer_seconds["total"]
    stages = {stage: sum(timer_seconds.get(key, 0.0) for key in keys) for stage, keys in STAGE_GRAPHS.items()}
    in_graphs = sum(v for k, v in timer_seconds.items() if k.startswith("graph:"))
    return {**stages, "overhead": total - in_graphs, "total": total, "denoise_loop": timer_seconds["denoise"]}


@dataclasses.dataclass(frozen=True)
class PipelineLatency:
    stages: dict[str, Stats]  # text_encoder, denoise, vae_decoder (graph time), overhead, total, denoise_loop, step
    overhead_fraction: float  # median over runs of overhead / total

    @classmethod
    def of(cls, runs: list[dict[str, float]], steps: int) -> PipelineLatency:
        """From `stage_seconds` of repeated runs; `step` is the denoising loop's time per step."""
        stages = {stage: Stats.of([run[stage] for run in runs]) for stage in runs[0]}
        stages["step"] = Stats.of([run["denoise_loop"] / steps for run in runs])
        return cls(stages, float(np.median([run["overhead"] / run["total"] for run in runs])))

    def to_dict(self) -> dict:
        return {"stages": {k: v.to_dict() for k, v in self.stages.items()}, "overhead_fraction": self.overhead_fraction}
