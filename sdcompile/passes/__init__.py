"""Graph passes over ONNX models, one module each, with one contract:
`run(model, options: PassOptions) -> PassResult(model, report)`, the input model left as it was
and the report the pass's own frozen dataclass.

`PASSES` maps the names the CLI accepts to the passes; `optimize_model` runs a list of them in
order and returns the new model with each pass's report as plain data.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from sdcompile.graph.external import inside, load_structure, spill
from sdcompile.graph.fp16_policy import Fp16Options, IoDtype
from sdcompile.graph.fp16_ranges import range_islands_from_samples
from sdcompile.graph.pass_result import PassResult
from sdcompile.graph.reports import plain_data
from sdcompile.graph.shape_inference import check_model_types
from sdcompile.options import AttentionTarget, Precision
from sdcompile.passes import cleanup, fp16, fused_attention, step_fusion, unfused_attention
from sdcompile.passes.cleanup import CleanupOptions
from sdcompile.passes.fused_attention import AttentionOptions
from sdrun.errors import UserError


@dataclass(frozen=True)
class PassOptions:
    """Per-pass options; None means that pass's defaults."""
    cleanup: CleanupOptions | None = None
    attention: AttentionOptions | None = None
    fp16: Fp16Options | None = None
    # The directory the pass runs in, where it may write the large tensors it creates as external data
    # (`optimize_on_disk` sets it for its own step directories); None: they stay in memory.
    scratch: Path | None = None


PASSES: dict[str, Callable[[onnx.ModelProto, PassOptions], PassResult]] = {
    "cleanup": cleanup.run,
    "fuse-attention": fused_attention.run,
    "unfuse-attention": unfused_attention.run,
    "fp16": fp16.run,
    "step-fusion": step_fusion.run,
}


def default_passes(precision: Precision) -> list[str]:
    """The pass list an export at `precision` runs."""
    passes = ["cleanup", "fuse-attention"]
    return passes + ["fp16"] if precision is Precision.FP16 else passes


def _check_names(passes: Sequence[str]) -> None:
    unknown = [name for name in passes if name not in PASSES]
    if unknown:
        raise UserError(f"Unknown graph pass: {', '.join(unknown)}.",
                        expected=f"one or more of: {', '.join(PASSES)}",
                        got=", ".join(passes), fix="choose pass names from the expected list")


def _with_target(options: PassOptions, target: AttentionTarget | None) -> PassOptions:
    if target is None:
        return options
    return replace(options, attention=replace(options.attention or AttentionOptions(), target=target))


def run_pass(name: str, model: onnx.ModelProto,
             options: PassOptions | None = None) -> tuple[onnx.ModelProto, dict]:
    """The pass called `name` on `model` (not modified): the new model, and the pass's report as
    plain data with its wall time in "seconds"."""
    _check_names([name])
    start = time.perf_counter()
    result = PASSES[name](model, options or PassOptions())
    return result.model, {**plain_data(result.report), "seconds": round(time.perf_counter() - start, 2)}


def optimize_model(model: onnx.ModelProto, passes: Sequence[str],
                   options: PassOptions | None = None, *,
                   attention_target: AttentionTarget | None = None) -> tuple[onnx.ModelProto, dict]:
    """Run `passes` (names from PASSES) in order on `model` (not modified).

    `attention_target` is shorthand for `options.attention.target`. Returns the optimized model,
    which passes `onnx.checker.check_model(full_check=True)`, and {pass name: its report as
    plain data}.
    """
    _check_names(passes)
    options = _with_target(options or PassOptions(), attention_target)
    optimized, reports = model, {}
    for name in passes:
        optimized, reports[name] = run_pass(name, optimized, options)
    check_model_types(optimized)
    return optimized, reports


def optimize_on_disk(path: Path, passes: Sequence[str], work: Path, options: PassOptions | None = None, *,
                     attention_target: AttentionTarget | None = None,
                     range_samples: Mapping[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict, Path]:
    """`optimize_model` for the graph at `path` with its weights left on disk (`sdcompile.graph.external`).

    Each pass runs on the previous result's structure inside its directory; what it returns is spilled
    into `work/<i>-<pass>/` (and the step before removed), so memory holds the graph and at most the
    tensors one pass creates. With `range_samples` (graph inputs), the fp16 pass also keeps in fp32 what
    the range finder (`graph.fp16_ranges`) finds on them in the graph it is about to cast, which runs in
    parts beside it. Returns (the optimized structure, the reports, the directory its data is in).
    """
    _check_names(passes)
    options = _with_target(options or PassOptions(), attention_target)
    path, work = Path(path).resolve(), Path(work).resolve()  # passes run inside their data directories
    model, directory, reports = load_structure(path), path.parent, {}
    for index, name in enumerate(passes):
        owned = directory.parent == work  # a step of ours, not the caller's source
        step_options = replace(options, scratch=directory if owned else None)
        if name == "fp16" and range_samples is not None:
            step_options = _with_ranges(step_options, path, range_samples)
        with inside(directory):
            model, reports[name] = run_pass(name, model, step_options)
        step = work / f"{index}-{name}"
        step.mkdir(parents=True)
        spill(model, step / "model.onnx", directory)
        if owned:
            shutil.rmtree(directory)
        directory, path = step, step / "model.onnx"
    with inside(directory):
        check_model_types(model)
    return model, reports, directory


def _with_ranges(options: PassOptions, graph: Path, samples: Mapping[str, np.ndarray]) -> PassOptions:
    ranges = range_islands_from_samples(graph, samples)
    return replace(options, fp16=replace(options.fp16 or Fp16Options(), ranges=ranges))


__all__ = [
    "PASSES", "PassOptions", "PassResult", "default_passes", "optimize_model", "optimize_on_disk", "run_pass",
    "CleanupOptions", "AttentionOptions", "AttentionTarget", "Fp16Options", "IoDtype",
]
