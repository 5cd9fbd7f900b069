"""Peak resident host memory of a benchmark variant, per stage: its load and each component's calls.

All variants live in one process, so a peak means "while this stage ran": the peak is restarted before
each stage (`sdrun.host_memory.restart_peak`) and read after it, as `sdrun --profile` measures a run.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdrun.profiling import RunProfile

LOAD = "load"


def measured_load(load: Callable[[], object]) -> tuple[object, float]:
    """`load()` and the peak resident GiB while it ran."""
    profile = RunProfile(Path())
    loaded = profile.measure(LOAD, load)
    return loaded, profile.host_peak_gib[LOAD]


def stage_peaks(pipeline, request) -> dict[str, float]:
    """Peak resident GiB per component while one `pipeline.generate(request)` ran (runners restored after)."""
    inner = {name: timed.runner for name, timed in pipeline.runners.items()}
    profile = RunProfile(Path())
    profile.watch(pipeline)
    try:
        pipeline.generate(request)
    finally:
        for name, runner in inner.items():
            pipeline.runners[name].runner = runner
    return {name: round(gib, 3) for name, gib in profile.host_peak_gib.items()}
