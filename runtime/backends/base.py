"""The one protocol every backend implements, and the timer the pipeline keeps.

A backend is a set of graph runners, one per bundle component, each taking and returning
named numpy arrays. ONNX Runtime, TensorRT and eager PyTorch differ only in how they make
runners (`sdrun.backends.BACKENDS`); the loop (`sdrun.pipeline`), classifier-free guidance
and the sampler update (`sdrun.sampling`, `sdrun.samplers`) never live in a backend.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class GraphRunner(Protocol):
    """Runs one component; feeds and results are keyed by the manifest's tensor names.

    Results may live in buffers the runner reuses: they stay valid until the same runner runs again.
    `rebuild_hint` is the command that rebuilds what the runner loaded, for error messages.
    """

    rebuild_hint: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class StageTimer:
    """Wall-clock seconds per stage; `runtime_overhead` is time outside graph calls."""

    seconds: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=dict)

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.counts[stage] = self.counts.get(stage, 0) + calls
