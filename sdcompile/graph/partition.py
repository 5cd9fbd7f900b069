"""A graph run as consecutive parts, each holding its own share of the weights.

ONNX Runtime's CPU session holds every weight of a graph at once — and for an fp16 graph also the
fp32 copies its CPU kernels compute on, about three times the fp16 bytes. Cut the node list (ONNX
keeps it in topological order) wherever the initializers referenced since the last cut reach
`budget` bytes; each part's inputs are the values it reads that earlier parts or the caller made,
its outputs the values later parts or the caller read. Run one part's session at a time and the
peak is one part's weights plus the values crossing the cuts, not the graph's weights.

A part is the same nodes with the same initializers (external tensors keep their locations, so a
part's file sits beside the graph's data file): the results equal the whole graph's on ONNX
Runtime, except that an fp16 value crossing a cut is rounded to fp16 as the graph declares, where a
whole-graph CPU session may keep it in fp32 between two upcast kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sdcompile.graph.external import load_structure, tensor_nbytes
from sdcompile.memory import return_freed_memory


@dataclass(frozen=True)
class Part:
    first: int  # node indices [first, stop) in graph order
    stop: int
    inputs: tuple[str, ...]  # values read from the caller's feeds or earlier parts
    outputs: tuple[str, ...]  # values later parts or the graph's outputs read


def plan_parts(graph: onnx.GraphProto, budget: int, max_nodes: int | None = None) -> list[Part]:
    """The cuts for `graph`: also after every `max_nodes` nodes when given (one part when its initializers
    fit `budget` and its nodes `max_nodes`, or when a node holds a subgraph, whose outer-scope reads this
    plan does not follow)."""
    sizes = {t.name: tensor_nbytes(t) for t in graph.initializer}
    nodes = graph.node
    few = max_nodes is None or len(nodes) <= max_nodes
    if (few and sum(sizes.values()) <= budget) or any(_has_subgraph(n) for n in nodes):
        return [_part(graph, 0, len(nodes), sizes)]
    bounds, held, first = [], 0, 0
    for index, node in enumerate(nodes):
        weight = sum(sizes.get(name, 0) for name in set(node.input))
        full = max_nodes is not None and index - first >= max_nodes
        if full or (held and held + weight > budget):
            bounds.append((first, index))
            first, held = index, 0
        held += weight
    bounds.append((first, len(nodes)))
    return [_part(graph, first, stop, sizes) for first, stop in bounds]


def _part(graph: onnx.GraphProto, first: int, stop: int, initializers: dict) -> Part:
    produced_here = {o for n in graph.node[first:stop] for o in n.output if o}
    produced_before = {o for n in graph.node[:first] for o in n.output if o} | {i.name for i in graph.input}
    read_here = [i for n in graph.node[first:stop] for i in n.input if i]
    read_after = {i for n in graph.node[stop:] for i in n.input if i} | {o.name for o in graph.output}
    inputs = dict.fromkeys(i for i in read_here
                           if i not in produced_here and i not in initializers and i in produced_before)
    outputs = dict.fromkeys(o for n in graph.node[first:stop] for o in n.output if o in read_after)
    return Part(first, stop, tuple(inputs), tuple(outputs))


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def part_model(model: onnx.ModelProto, part: Part, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`part` of `model` (a structure: external tensors not loaded) as a model of its own; its inputs are
    typed from the arrays in `feeds`, its outputs from the graph's value infos where they are known."""
    graph = model.graph
    nodes = graph.node[part.first:part.stop]
    read = {i for n in nodes for i in n.input}
    known = {v.name: v for v in (*graph.value_info, *graph.output)}
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                            feeds[name].shape) for name in part.inputs]
    outputs = [known.get(name) or onnx.ValueInfoProto(name=name) for name in part.outputs]
    sub = helper.make_graph(nodes, f"{graph.name}-part{part.first}", inputs, outputs,
                            initializer=[t for t in graph.initializer if t.name in read])
    return helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)


def cpu_session(graph: Path):
    """An ONNX Runtime CPU session that keeps one copy of the weights: no pre-packed duplicates, no graph
    optimizations (which on an fp16 graph fold the Casts ONNX Runtime's CPU kernels need into fp32 copies
    of the weights), and no memory arena, which grows in powers of two and keeps what it grew to — for
    an fp16 part, twice the fp32 copies its kernels make. The graph is checked as written, node by node."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def run_in_parts(path: Path, feeds: dict[str, np.ndarray], budget: int, session) -> dict[str, np.ndarray]:
    """The graph outputs of the model at `path` on `feeds`, computed part by part; `session(file)` makes the
    inference session for one part's file (which is written beside `path` and removed after its run)."""
    path = Path(path)
    model = load_structure(path)
    parts = plan_parts(model.graph, budget)
    wanted = [o.name for o in model.graph.output]
    if len(parts) == 1:
        return dict(zip(wanted, session(path).run(wanted, feeds)))
    values = dict(feeds)
    for index, part in enumerate(parts):
        file = path.with_name(f".part-{index}.onnx")
        onnx.save_model(part_model(model, part, values), str(file))
        try:
            runner = session(file)
            values.update(zip(part.outputs, runner.run(list(part.outputs), {n: values[n] for n in part.inputs})))
            del runner
        finally:
            file.unlink()
        return_freed_memory()
        needed_later = {i for p in parts[index + 1:] for i in p.inputs} | set(wanted)
        values = {k: v for k, v in values.items() if k in needed_later}
    return {name: values[name] for name in wanted}
