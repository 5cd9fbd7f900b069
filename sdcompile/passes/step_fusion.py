"""Step fusion: wrap a plain UNet graph into one whole denoising step.

    x (B,C,h,w) ─┬─ Concat(x, x) ─▶ UNet(·, t, context (2B,77,D)) ─▶ Split ─▶ uncond, cond
                 │                   guided = uncond + g·(cond − uncond)       (Ho & Salimans 2022)
                 └──────────────▶ x_next = c_x·x + c_out·guided + sigma·noise (DDIM, Song et al. 2021, eq. 12)

The sampler's coefficients are computed on the host by `sdrun.schedulers` and fed as the tiny
input `step_coefficients` = [c_x, c_out, sigma]; for eps- and v-prediction alike the DDIM update
is linear in x and the model output. With it a denoising step is one engine call and the loop
does no array math outside the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto, helper

from sdcompile.graph.pass_result import PassResult

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUT = "latent"
STEP_INPUTS = ("sample", "timestep", "encoder_hidden_states", "guidance", "step_coefficients", "noise")
_PREFIX = "unet_step/"


@dataclass(frozen=True)
class StepFusionReport:
    fp32_node_names: tuple[str, ...]  # the nodes this pass added, see `wrapper_node_names`


def step_fused_unet(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model whose graph runs CFG and the DDIM update around `model`'s UNet graph."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    _check_conventional_io(fused)
    inner = {name: f"{_PREFIX}{name}" for name in (*UNET_INPUTS, UNET_OUTPUT)}
    _rename_values(graph, inner)
    sample = _input(model.graph, "sample")
    latent_dims = _dims(sample)
    batch_dims = ["batch", *latent_dims[1:]]
    graph.ClearField("input")
    graph.input.extend([
        _value("sample", sample.type.tensor_type.elem_type, batch_dims),
        _clone(_input(model.graph, "timestep"), "timestep"),
        _clone(_input(model.graph, "encoder_hidden_states"), "encoder_hidden_states"),
        _value("guidance", TensorProto.FLOAT, [1]),
        _value("step_coefficients", TensorProto.FLOAT, [3]),
        _value("noise", sample.type.tensor_type.elem_type, batch_dims),
    ])
    graph.ClearField("output")
    graph.output.append(_value("latent", sample.type.tensor_type.elem_type, batch_dims))
    before, after = _wrapper_nodes(inner)
    body = list(graph.node)
    graph.ClearField("node")
    graph.node.extend([*before, *body, *after])
    return fused


def _wrapper_nodes(inner: dict[str, str]) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Nodes that feed the UNet body, and nodes that consume its output."""
    p = _PREFIX
    before = [
        helper.make_node("Concat", ["sample", "sample"], [inner["sample"]], axis=0, name=f"{p}cfg_batch"),
        helper.make_node("Identity", ["timestep"], [inner["timestep"]], name=f"{p}timestep"),
        helper.make_node("Identity", ["encoder_hidden_states"], [inner["encoder_hidden_states"]], name=f"{p}context"),
    ]
    after = [
        helper.make_node("Split", [inner["latent"]], [f"{p}uncond", f"{p}cond"], axis=0, num_outputs=2,
                         name=f"{p}split_cfg"),
        helper.make_node("Sub", [f"{p}cond", f"{p}uncond"], [f"{p}delta"], name=f"{p}cfg_delta"),
        helper.make_node("Mul", ["guidance", f"{p}delta"], [f"{p}scaled_delta"], name=f"{p}cfg_scale"),
        helper.make_node("Add", [f"{p}uncond", f"{p}scaled_delta"], [f"{p}guided"], name=f"{p}cfg"),
        helper.make_node("Split", ["step_coefficients"], [f"{p}c_x", f"{p}c_out", f"{p}sigma"], axis=0,
                         num_outputs=3, name=f"{p}coefficients"),
        helper.make_node("Mul", [f"{p}c_x", "sample"], [f"{p}x_term"], name=f"{p}x_term"),
        helper.make_node("Mul", [f"{p}c_out", f"{p}guided"], [f"{p}out_term"], name=f"{p}out_term"),
        helper.make_node("Mul", [f"{p}sigma", "noise"], [f"{p}noise_term"], name=f"{p}noise_term"),
        helper.make_node("Add", [f"{p}x_term", f"{p}out_term"], [f"{p}deterministic"], name=f"{p}sum"),
        helper.make_node("Add", [f"{p}deterministic", f"{p}noise_term"], ["latent"], name=f"{p}update"),
    ]
    return before, after


def wrapper_node_names(model: onnx.ModelProto) -> list[str]:
    """The nodes this pass added: CFG and the sampler update, deliberately in fp32 (an fp32 island:
    the latent is accumulated over every step, so its update keeps full precision)."""
    return [n.name for n in model.graph.node if n.name.startswith(_PREFIX)]


def run(model: onnx.ModelProto, options: PassOptions) -> PassResult:
    fused = step_fused_unet(model)
    return PassResult(fused, StepFusionReport(tuple(wrapper_node_names(fused))))


def _check_conventional_io(model: onnx.ModelProto) -> None:
    from sdrun.errors import UserError

    graph = model.graph
    inputs = tuple(i.name for i in graph.input)
    outputs = tuple(o.name for o in graph.output)
    if set(inputs) != set(UNET_INPUTS) or outputs != (UNET_OUTPUT,):
        raise UserError("step fusion needs a UNet graph with conventional I/O.",
                        expected=f"inputs {', '.join(UNET_INPUTS)} -> output {UNET_OUTPUT}",
                        got=f"inputs {', '.join(inputs)} -> outputs {', '.join(outputs)}",
                        fix="export the UNet with `sdcompile export --component unet`, or rename its I/O")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:  # Split's num_outputs attribute
        raise UserError("step fusion needs a graph of opset >= 18.", got=f"opset {opset}",
                        fix="re-export with --opset 23")


def _rename_values(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in graph.value_info:
        value.name = names.get(value.name, value.name)


def _input(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    return next(i for i in graph.input if i.name == name)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _value(name: str, elem_type: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def _clone(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    clone = onnx.ValueInfoProto()
    clone.CopyFrom(value)
    clone.name = name
    return clone
