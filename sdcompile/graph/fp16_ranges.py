"""The fp32 islands sample inputs call for: nodes whose values come near the fp16 range.

The fp32 graph runs on ONNX Runtime CPU with every intermediate exposed; a float value whose
max |x| exceeds `RANGE_THRESHOLD` keeps its producer and every node that reads it in fp32 (a
consumer cast to fp16 would turn it into inf as surely as an fp16 producer would). Only values
that depend on a float graph input count: one computed from constants alone (a -inf attention
mask) is a constant the fp16 pass clamps to ±65504, which keeps its meaning.

When more than `WHOLE_GRAPH_FRACTION` of the graph's heavy ops that the default policy casts
(fp16_policy.HEAVY_OPS less the default fp32 norms) would be kept, the whole graph stays fp32
instead (`RangeIslands.whole_graph`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from sdcompile.graph.external import load_structure
from sdcompile.graph.fp16_policy import DEFAULT_FP32_OP_TYPES, HEAVY_OPS, RangeIslands, RangeKeep
from sdcompile.graph.partition import Part, cpu_session, part_model, plan_parts
from sdcompile.memory import return_freed_memory

# 2¹⁴, a quarter of fp16's largest finite value (65504): the samples are one seed at one size, and
# other prompts, seeds and resolutions move activations; two bits of headroom also keep the sum of
# two values under the threshold finite in fp16 (2·2¹⁴ < 65504), as a residual Add needs.
RANGE_THRESHOLD = 2.0**14
# Past half of the convolutions and matrix products in fp32, what stays fp16 saves little next to
# the Casts at every island border, and a graph this hot on one sample is likely hotter on others.
WHOLE_GRAPH_FRACTION = 0.5
CAST_HEAVY_OPS = HEAVY_OPS - DEFAULT_FP32_OP_TYPES  # group norms are fp32 whatever the ranges
RANGE_PART_BYTES = 512 * 1024**2  # weights per session, as verification's parts
RANGE_PART_NODES = 16  # nodes per session, all of whose outputs are held at once


def observed_max_abs(path: Path, feeds: Mapping[str, np.ndarray], session=cpu_session, *,
                     budget: int = RANGE_PART_BYTES, max_nodes: int = RANGE_PART_NODES) -> dict[str, float]:
    """max |x| of every float value (graph input or node output) the graph at `path` computes on `feeds`.

    Runs as `graph.partition` parts of at most `budget` bytes of weights and `max_nodes` nodes, each
    exposing every output of its nodes, so the peak is one part's weights, the values crossing its cuts
    and at most `max_nodes` nodes' outputs (at verification's 256 px, SDXL's VAE decoder's largest value
    is 128·256²·4 B = 32 MiB: 512 MiB of exposed values). Part files are written beside `path`.
    """
    path = Path(path)
    model = load_structure(path)
    parts = plan_parts(model.graph, budget, max_nodes)
    maxima = {name: _max_abs(v) for name, v in feeds.items() if _is_float(v)}
    for values in exposed_values(path, model, parts, feeds, session):
        maxima.update((name, _max_abs(v)) for name, v in values.items() if name not in maxima and _is_float(v))
    return maxima


def exposed_values(path: Path, model: onnx.ModelProto, parts: list[Part], feeds: Mapping[str, np.ndarray],
                   session=cpu_session) -> Iterator[dict[str, np.ndarray]]:
    """For each of `parts` of the graph at `path` (`model`: its structure) in turn, every value it computes on
    `feeds` (with the values it read); what no later part reads is dropped before the next part runs."""
    values = dict(feeds)
    for index, part in enumerate(parts):
        values.update(_run_part(path, model, _exposing_all(model.graph, part), values, session, index))
        yield values
        needed_later = {i for p in parts[index + 1:] for i in p.inputs}
        values = {k: v for k, v in values.items() if k in needed_later}
    return_freed_memory()


def _exposing_all(graph: onnx.GraphProto, part: Part) -> Part:
    produced = (o for n in graph.node[part.first:part.stop] for o in n.output if o)
    return replace(part, outputs=tuple(dict.fromkeys((*part.outputs, *produced))))


def _run_part(path: Path, model: onnx.ModelProto, part: Part, values: dict, session, index: int) -> dict:
    file = path.with_name(f".ranges-part-{index}.onnx")
    onnx.save_model(part_model(model, part, values), str(file))
    try:
        runner = session(file)
        return dict(zip(part.outputs, runner.run(list(part.outputs), {n: values[n] for n in part.inputs})))
    finally:
        file.unlink()


def _is_float(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.floating)


def _max_abs(values: np.ndarray) -> float:
    """max |x|; inf when any element is inf or NaN (an fp32 overflow already)."""
    if not values.size:
        return 0.0
    peak = float(np.max(np.abs(values)))
    return peak if np.isfinite(peak) else float("inf")


def range_islands(graph: onnx.GraphProto, maxima: Mapping[str, float],
                  threshold: float = RANGE_THRESHOLD) -> RangeIslands:
    """The nodes of `graph` that produce or read an input-dependent value past `threshold` under
    `maxima` (from `observed_max_abs`), and whether the whole graph should stay fp32 instead."""
    dependent = _input_dependent(graph, maxima)
    hot = {name: peak for name, peak in maxima.items() if peak > threshold and name in dependent}
    kept = tuple(k for k in (_kept(node, hot, threshold) for node in graph.node) if k is not None)
    heavy_total = sum(1 for n in graph.node if n.op_type in CAST_HEAVY_OPS)
    heavy_kept = sum(1 for k in kept if k.op in CAST_HEAVY_OPS)
    whole = heavy_kept > WHOLE_GRAPH_FRACTION * heavy_total
    return RangeIslands(threshold, kept, heavy_kept, heavy_total, whole)


def _input_dependent(graph: onnx.GraphProto, floats: Mapping[str, float]) -> set[str]:
    """Float values (names in `floats`) computed from a float graph input through float values."""
    dependent = {i.name for i in graph.input if i.name in floats}
    for node in graph.node:
        if any(i in dependent for i in node.input):
            dependent.update(o for o in node.output if o in floats)
    return dependent


def _kept(node: onnx.NodeProto, hot: Mapping[str, float], threshold: float) -> RangeKeep | None:
    touched = [t for t in (*node.output, *node.input) if t in hot]
    if not touched:
        return None
    if not node.name:
        raise ValueError(f"an unnamed {node.op_type} node touches {touched[0]} (max |x| {hot[touched[0]]:g}): "
                         "name every node before finding range islands")
    tensor = max(touched, key=hot.__getitem__)
    return RangeKeep(node.name, node.op_type, tensor, hot[tensor], threshold)


def range_islands_from_samples(path: Path, feeds: Mapping[str, np.ndarray],
                               threshold: float = RANGE_THRESHOLD) -> RangeIslands:
    """`range_islands` of the graph at `path` on `feeds` (a structure whose weights stay on disk)."""
    maxima = observed_max_abs(path, feeds)
    return range_islands(load_structure(Path(path)).graph, maxima, threshold)
