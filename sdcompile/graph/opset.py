"""Raise a graph's default-domain opset, rewriting the few ops whose meaning changed.

Between opset 13 and 24 most operator revisions only add types or attributes whose defaults
keep the old behaviour. The exceptions handled here:
- Reduce{Mean,Max,Min,Prod,SumSquare,L1,L2,LogSum,LogSumExp}-18 take `axes` as an input
  instead of an attribute;
- GroupNormalization-21 takes per-channel scale/bias (C,) instead of per-group (G,);
- GridSample-20 renames modes `bilinear`/`bicubic` to `linear`/`cubic`.
DFT-20 (axis attribute -> input) and graphs below opset 13 are refused.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdrun.errors import UserError

MIN_UPGRADABLE_OPSET = 13
REDUCE_AXES_AS_INPUT_SINCE = 18
REDUCE_OPS_WITH_AXES_ATTRIBUTE = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"})
GROUP_NORM_PER_CHANNEL_SINCE = 21
GRID_SAMPLE_RENAMED_SINCE = 20
GRID_SAMPLE_MODES = {"bilinear": "linear", "bicubic": "cubic"}
DFT_AXIS_INPUT_SINCE = 20


def _crosses(old: int, new: int, since: int) -> bool:
    return old < since <= new


def _reduce_axes_to_input(node: gs.Node) -> None:
    axes = node.attrs.pop("axes", None)
    if axes is not None:
        node.inputs.append(gs.Constant(f"{node.name or node.outputs[0].name}_axes",
                                       np.array(axes, dtype=np.int64)))


def _group_norm_per_channel(node: gs.Node) -> None:
    x, scale, bias = node.inputs[:3]
    channels, groups = (x.shape[1] if x.shape else None), node.attrs.get("num_groups")
    if not (isinstance(scale, gs.Constant) and isinstance(bias, gs.Constant)
            and isinstance(channels, int) and groups):
        raise UserError(
            f"Cannot raise the opset of GroupNormalization node {node.name!r}.",
            expected="per-group scale/bias given as constants and a static channel count",
            got=f"scale {type(scale).__name__}, bias {type(bias).__name__}, channels {channels}",
            fix="re-export the model at opset >= 21 (GroupNormalization-21 is per-channel)")
    repeat = channels // groups
    node.inputs[1] = gs.Constant(f"{scale.name}_per_channel", np.repeat(scale.values, repeat))
    node.inputs[2] = gs.Constant(f"{bias.name}_per_channel", np.repeat(bias.values, repeat))


def _upgrade_node(node: gs.Node, old: int, new: int) -> None:
    if (node.domain or "") != "":
        return
    if node.op in REDUCE_OPS_WITH_AXES_ATTRIBUTE and _crosses(old, new, REDUCE_AXES_AS_INPUT_SINCE):
        _reduce_axes_to_input(node)
    elif node.op == "GroupNormalization" and _crosses(old, new, GROUP_NORM_PER_CHANNEL_SINCE):
        _group_norm_per_channel(node)
    elif node.op == "GridSample" and _crosses(old, new, GRID_SAMPLE_RENAMED_SINCE):
        mode = node.attrs.get("mode", "bilinear")
        node.attrs["mode"] = GRID_SAMPLE_MODES.get(mode, mode)
    elif node.op == "DFT" and _crosses(old, new, DFT_AXIS_INPUT_SINCE):
        raise UserError(f"Cannot raise the opset of DFT node {node.name!r} automatically.",
                        expected=f"a graph without DFT below opset {DFT_AXIS_INPUT_SINCE}",
                        got=f"opset {old}", fix=f"re-export the model at opset >= {new}")


def set_default_opset(graph: gs.Graph, version: int) -> None:
    """Record `version` as the default-domain opset (graph field and opset imports), with at
    least the IR version that opset needs."""
    graph.opset = version
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)])
    graph.ir_version = max(graph.ir_version or 0, needed)
    if graph.import_domains is not None:
        others = [d for d in graph.import_domains if d.domain not in ("", "ai.onnx")]
        graph.import_domains = [onnx.helper.make_opsetid("", version)] + others


def upgrade_opset_in_place(graph: gs.Graph, version: int) -> None:
    """Raise the default-domain opset of `graph` (already a private copy) to `version`."""
    old = graph.opset
    if old >= version:
        return
    if old < MIN_UPGRADABLE_OPSET:
        raise UserError("The model's opset is too old to raise automatically.",
                        expected=f"opset >= {MIN_UPGRADABLE_OPSET}", got=f"opset {old}",
                        fix=f"re-export the model with opset_version >= {MIN_UPGRADABLE_OPSET}")
    for node in graph.nodes:
        _upgrade_node(node, old, version)
    set_default_opset(graph, version)
