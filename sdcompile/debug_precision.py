"""`sdcompile debug precision`: where an fp16 graph loses accuracy, node by node.

The reference is the fp16 graph's own structure computed in fp32 (`fp32_twin`): every fp16 initializer,
Cast target and declared type back to float32, nothing else changed. Node and tensor names are the
fp16 graph's, which the fp16 pass carried over from the fp32 graph it started from, so every node output
is compared with itself and the names printed are the ones `sdcompile export --fp32-islands` takes. The
twin's weights are the fp16 weights widened, so the report measures fp16 activations and arithmetic (where
overflow lives), not the rounding of the weights (which the export gates already measure as a whole).

Both graphs run on ONNX Runtime CPU one node per session (`graph.fp16_ranges.exposed_values`), so every
value crosses to the next node in the type the graph declares, as in TensorRT's strongly typed networks. A
whole-graph CPU session does not do that: it computes the fp16 ops it has no fp16 kernel for (Pow,
ReduceMean, Sqrt...) in fp32 and keeps fp32 between neighbours, which hides their overflow.

A node is an *offender* when its output is non-finite where the reference is finite, or its relative L2
error passes the threshold while every float input it reads from another node is under it: the node where
the error is born, not the nodes it flows into. The islands suggested for them also hold every value fp16
cannot represent and its readers (`suggested_islands`).
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from sdcompile.graph.dtypes import DTYPE_ATTRIBUTE_OPS
from sdcompile.graph.fp16_ranges import RANGE_PART_BYTES, exposed_values
from sdcompile.graph.partition import plan_parts
from sdrun.errors import UserError
from sdrun.metrics import max_abs_error, relative_l2

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# A node whose output's relative L2 error against fp32 passes this is past the threshold: ten times what
# the fp16 gates allow a whole graph output (`sdrun.gates`), so one node alone rarely gets there.
DEFAULT_REL_L2 = 0.05
ISLANDS_OPTION = "--fp32-islands"


@dataclasses.dataclass(frozen=True)
class NodeError:
    node: str
    op: str
    tensor: str  # the node output compared (its first float output)
    max_abs: float  # max |fp16 − fp32| over the elements finite in both
    rel_l2: float  # ‖fp16 − fp32‖₂ / ‖fp32‖₂ (inf when fp16 is non-finite where fp32 is not)
    nonfinite: int  # elements inf/NaN in fp16 and finite in fp32 (overflow, or NaN from it)
    fp16_range: float  # max |x| of the fp32 value over 65504: above 1 it cannot be held in fp16


@dataclasses.dataclass(frozen=True)
class PrecisionReport:
    component: str
    threshold: float
    nodes: tuple[NodeError, ...]  # graph order, float-producing nodes only
    offenders: tuple[str, ...]  # node names, graph order
    islands: tuple[str, ...]  # what to keep in fp32 for them (`suggested_islands`), graph order

    @property
    def islands_argument(self) -> str:
        return f"{ISLANDS_OPTION} {','.join(self.islands)}" if self.islands else ""

    def to_dict(self) -> dict:
        return {"component": self.component, "threshold": self.threshold, "offenders": list(self.offenders),
                "islands": list(self.islands),
                "islands_argument": self.islands_argument,
                "nodes": [dataclasses.asdict(n) for n in self.nodes]}


def fp32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (weights loaded) with every float16 it declares or casts to made float32."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            widened = numpy_helper.to_array(tensor).astype(np.float32)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(widened, tensor.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        _widen_attributes(node)
    return twin


def _widen_attributes(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
            attribute.i = TensorProto.FLOAT
        elif node.op_type in DTYPE_ATTRIBUTE_OPS and attribute.name == "dtype" and attribute.i == TensorProto.FLOAT16:
            attribute.i = TensorProto.FLOAT
        elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
            widened = numpy_helper.to_array(attribute.t).astype(np.float32)
            attribute.t.CopyFrom(numpy_helper.from_array(widened, attribute.t.name))


def node_error(node: onnx.NodeProto, tensor: str, fp16: np.ndarray, fp32: np.ndarray) -> NodeError:
    """The statistics of one node output (`fp16` from the fp16 graph, `fp32` from its twin)."""
    fp16, fp32 = np.asarray(fp16, np.float64), np.asarray(fp32, np.float64)
    finite = np.isfinite(fp16) & np.isfinite(fp32)
    nonfinite = int(np.count_nonzero(~np.isfinite(fp16) & np.isfinite(fp32)))
    peak = float(np.max(np.abs(fp32[np.isfinite(fp32)]), initial=0.0))
    rel = math.inf if nonfinite else relative_l2(fp32[finite], fp16[finite])
    return NodeError(node.name, node.op_type, tensor, max_abs_error(fp32[finite], fp16[finite]), rel, nonfinite,
                     peak / FP16_MAX)


def offenders(graph: onnx.GraphProto, errors: Mapping[str, NodeError], threshold: float) -> tuple[str, ...]:
    """Nodes past `threshold` (or non-finite) whose node-made float inputs are all under it (module doc)."""
    by_tensor = {e.tensor: e for e in errors.values()}
    found = []
    for node in graph.node:
        error = errors.get(node.name)
        if error is None or not _past(error, threshold):
            continue
        inputs = [by_tensor[i] for i in node.input if i in by_tensor]
        if not any(_past(e, threshold) for e in inputs):
            found.append(node.name)
    return tuple(found)


def suggested_islands(graph: onnx.GraphProto, errors: Mapping[str, NodeError],
                      first: tuple[str, ...]) -> tuple[str, ...]:
    """The nodes to keep in fp32: the offenders, every node whose fp32 value fp16 cannot hold (|x| > 65504)
    and every node that reads one (an fp16 consumer would read it as inf), as the range finder keeps them
    (`graph.fp16_ranges`). A Cast stands for its consumers: an island reads the uncast value directly."""
    out_of_range = {e.tensor for e in errors.values() if e.fp16_range > 1.0}
    kept = {n.name for n in graph.node if n.name in first or n.name in errors
            and (errors[n.name].tensor in out_of_range or any(i in out_of_range for i in n.input))}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    casts = {n.name: n.output[0] for n in graph.node if n.op_type == "Cast"}
    for name in sorted(kept & set(casts)):
        kept.discard(name)
        kept.update(c for c in consumers.get(casts[name], ()) if c not in casts)
    return tuple(n.name for n in graph.node if n.name in kept)


def _past(error: NodeError, threshold: float) -> bool:
    return error.nonfinite > 0 or error.rel_l2 > threshold


def compare_graphs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], work: Path,
                   threshold: float = DEFAULT_REL_L2) -> tuple[NodeError, ...]:
    """Every float node output of the fp16 `model` (weights loaded) against its `fp32_twin` on `feeds`
    (float32; cast to each graph's input types), part by part in `work`."""
    twin = fp32_twin(model)
    paths = {}
    for name in ("fp16", "fp32"):  # where each graph's part files are written (they embed their weights)
        paths[name] = work / name / "model.onnx"
        paths[name].parent.mkdir(parents=True)
    parts = plan_parts(model.graph, RANGE_PART_BYTES, max_nodes=1)
    produced = {o: n for n in model.graph.node for o in n.output if o}
    halves = exposed_values(paths["fp16"], model, parts, _typed_feeds(model.graph, feeds))
    fulls = exposed_values(paths["fp32"], twin, parts, _typed_feeds(twin.graph, feeds))
    errors: dict[str, NodeError] = {}
    for half, full in zip(halves, fulls):
        for tensor, value in half.items():
            node = produced.get(tensor)
            if (node is None or node.name in errors or not np.issubdtype(value.dtype, np.floating)
                    or tensor not in full):
                continue
            errors[node.name] = node_error(node, tensor, value, full[tensor])
    return tuple(errors[n.name] for n in model.graph.node if n.name in errors)


def _typed_feeds(graph: onnx.GraphProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}
    return {name: np.asarray(value).astype(types[name]) for name, value in feeds.items() if name in types}


def debug_precision(model: onnx.ModelProto, component: str, feeds: Mapping[str, np.ndarray],
                    threshold: float = DEFAULT_REL_L2) -> PrecisionReport:
    """The node-by-node report of the fp16 graph `model` of `component` on `feeds`."""
    if not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        raise UserError(f"{component} holds no fp16 weights: there is no fp16 graph to debug.",
                        fix="export the bundle with --precision fp16")
    with tempfile.TemporaryDirectory(prefix="sdcompile-precision-") as work:
        errors = compare_graphs(model, feeds, Path(work), threshold)
    by_node = {e.node: e for e in errors}
    first = offenders(model.graph, by_node, threshold)
    return PrecisionReport(component, threshold, errors, first, suggested_islands(model.graph, by_node, first))


def debug_bundle_component(bundle: Path, component: str, scales: Mapping[str, float] | None = None, seed: int = 0,
                           threshold: float = DEFAULT_REL_L2) -> PrecisionReport:
    """`debug_precision` of a bundle's component on its verification-size sample inputs (seeded), scaled."""
    import torch

    from sdcompile.components import component_spec
    from sdcompile.components.spec import verify_binding
    from sdrun.bundle import open_bundle

    opened = open_bundle(Path(bundle), lambda manifest: [component])
    spec = component_spec(component, opened.recipe)
    samples = spec.sample(opened.recipe, verify_binding(opened.recipe), torch.Generator().manual_seed(seed))
    feeds = scaled_inputs({k: v.numpy() for k, v in samples.items()}, scales or {})
    return debug_precision(onnx.load(str(opened.graph_path(component))), component, feeds, threshold)


def scaled_inputs(feeds: Mapping[str, np.ndarray], scales: Mapping[str, float]) -> dict[str, np.ndarray]:
    """`feeds` with the named inputs multiplied (`--scale NAME=FACTOR`: push activations toward fp16's range)."""
    unknown = sorted(set(scales) - set(feeds))
    if unknown:
        raise UserError(f"--scale names no input of this component: {', '.join(unknown)}.",
                        expected=" | ".join(feeds), got=", ".join(unknown), fix="use one of the expected names")
    return {name: value * scales[name] if name in scales else value for name, value in feeds.items()}


def format_report(report: PrecisionReport, top: int = 10) -> str:
    """The offenders and the `top` nodes by error as a markdown table, then the export argument."""
    worst = sorted(report.nodes, key=lambda e: (e.nonfinite, e.rel_l2), reverse=True)[:top]
    lines = [f"# fp16 precision of {report.component}", "",
             f"{len(report.nodes)} nodes compared with the same graph in fp32; threshold rel L2 {report.threshold:g}.",
             "", "| node | op | max abs | rel L2 | non-finite | fp16 range used |", "|---|---|---|---|---|---|"]
    lines += [f"| {e.node} | {e.op} | {e.max_abs:.4g} | {e.rel_l2:.4g} | {e.nonfinite} | {e.fp16_range:.3g} |"
              for e in worst]
    if not report.offenders:
        return "\n".join([*lines, "", "no node is past the threshold."])
    return "\n".join([*lines, "", f"first nodes past the threshold: {', '.join(report.offenders)}", "",
                      "keep them and what fp16 cannot hold in fp32 with:",
                      f"  sdcompile export ... --precision fp16 {report.islands_argument}"])
