"""Open a bundle and put it on a backend: the one place where file reading and backend choice meet.

The CLI, the server and the benchmark call these; the pipeline itself does no I/O.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sdrun.backends import BackendOptions, check_lora_swap, make_runners, resolve_backend
from sdrun.backends.base import GraphRunner
from sdrun.bundle import Bundle, open_bundle
from sdrun.lora import LoraRequest
from sdrun.lora.swap import lora_overrides
from sdrun.pipeline import Pipeline, needed_components


@dataclasses.dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Pipeline
    runners: dict[str, GraphRunner]  # the pipeline's runners, for callers that run components alone
    backend: str  # the backend `auto` resolved to
    load_seconds: float  # making the runners (sessions, engines, eager models)
    lora_seconds: float = 0.0  # reading LoRAs and computing the weights they change (part of load_seconds)
    loras: tuple[dict, ...] = ()  # `sdrun.lora.lora_record` of each LoRA swapped in


def open_for_run(path: Path, step_fusion: bool | None = None, img2img: bool = False) -> Bundle:
    """The bundle with the files of the components such a run loads verified.

    `step_fusion`: None uses the step-fused UNet when the bundle has it (it runs every sampler);
    True requires it; False loads the plain UNet (guidance and the update on the host).
    """
    return open_bundle(path, lambda manifest: needed_components(manifest, step_fusion, img2img))


def pipeline_on(bundle: Bundle, backend: str, options: BackendOptions = BackendOptions(),
                echo: Callable[[str], None] = lambda line: None,
                loras: Sequence[LoraRequest] = ()) -> LoadedPipeline:
    """Runners for every verified component on `backend` (`auto` resolved here) in a pipeline, with `loras`
    swapped into the graphs' weights."""
    components = sorted(bundle.verified)
    backend = resolve_backend(backend, bundle, components, echo)
    start = time.perf_counter()
    records = []
    if loras:
        check_lora_swap(backend)
        overrides, records = lora_overrides(bundle, components, loras)
        options = dataclasses.replace(options, initializers=overrides)
    lora_seconds = time.perf_counter() - start
    runners = make_runners(backend, bundle, components, options)
    return LoadedPipeline(Pipeline(bundle, runners), runners, backend, time.perf_counter() - start, lora_seconds,
                          tuple(records))


def load_pipeline(path: Path, backend: str = "onnxruntime", *, step_fusion: bool | None = None,
                  img2img: bool = False, options: BackendOptions = BackendOptions(),
                  loras: Sequence[LoraRequest] = ()) -> LoadedPipeline:
    return pipeline_on(open_for_run(path, step_fusion, img2img), backend, options, loras=loras)
