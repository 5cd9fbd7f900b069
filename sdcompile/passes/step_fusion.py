"""Step fusion: wrap a plain UNet graph into one whole denoising step of any sampler.

    state (W,B,C,h,w) ─┬─ x_in = input_scale·state[0] ─ Concat(x_in, x_in) ─▶ UNet(·, t, context (2B,77,D)[, added])
                       │      ─▶ Split ─▶ y = uncond + g·(cond − uncond)                 (Ho & Salimans 2022)
                       └──────▶ next_state = update @ [state_0 .. state_{W-1}, y, noise]   (W,B,C,h,w)

`update` (W, W + 2) is one evaluation of a sampler plan (`sdrun.samplers.plan`): every sampler
the runtime offers is a linear recurrence over the latent and a few stored tensors, so one graph
serves them all and a step is one engine call whatever the sampler. The state has a fixed width
(`STATE_WIDTH`, the widest sampler's); narrower samplers leave the extra slots at zero. Guidance
1 feeds [cond; cond] as context. SDXL's added conditioning (`text_embeds`, `time_ids`, (2B, ·)) passes
through like the context. An inpainting UNet (its sample wider than its output by the mask and the
masked-image latents, `sdrun.recipe.INPAINT_CHANNELS`) takes those as inputs (2B, ·, h, w) too, concatenated
after x_in's channels inside the graph; the state keeps the output's channels. The wrapper's nodes stay in fp32 (`wrapper_node_names`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto, helper

from sdcompile.graph.pass_result import PassResult
from sdrun.recipe import INPAINT_CHANNELS
from sdrun.samplers.plan import STATE_WIDTH

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL's UNet, both or neither
UNET_OUTPUT = "latent"
STEP_OUTPUT = "next_state"
_PREFIX = "unet_step/"


@dataclass(frozen=True)
class StepFusionReport:
    fp32_node_names: tuple[str, ...]  # the nodes this pass added, see `wrapper_node_names`


def step_fused_unet(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model whose graph runs guidance and a sampler plan's linear update around `model`'s UNet."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    _check_conventional_io(fused)
    conditioning = conditioning_inputs(model)
    inner = {name: f"{_PREFIX}{name}" for name in ("sample", "timestep", *conditioning, UNET_OUTPUT)}
    _rename_values(graph, inner)
    sample = _input(model.graph, "sample")
    latent_type = sample.type.tensor_type.elem_type
    latent_dims = ["batch", *_dims(model.graph.output[0])[1:]]
    inpainting = inpainting_inputs(model)
    guided_dims = _dims(sample)
    graph.ClearField("input")
    graph.input.extend([
        _value("state", latent_type, [STATE_WIDTH, *latent_dims]),
        _clone(_input(model.graph, "timestep"), "timestep"),
        _value("input_scale", TensorProto.FLOAT, [1]),
        *(_clone(_input(model.graph, name), name) for name in conditioning),
        *(_value(name, latent_type, [guided_dims[0], channels, *guided_dims[2:]])
          for name, channels in inpainting.items()),
        _value("guidance", TensorProto.FLOAT, [1]),
        _value("update", TensorProto.FLOAT, [STATE_WIDTH, STATE_WIDTH + 2]),
        _value("noise", latent_type, latent_dims),
    ])
    graph.ClearField("output")
    graph.output.append(_value(STEP_OUTPUT, latent_type, [STATE_WIDTH, *latent_dims]))
    before, after = _wrapper_nodes(inner, conditioning, tuple(inpainting))
    body = list(graph.node)
    graph.ClearField("node")
    graph.node.extend([*before, *body, *after])
    return fused


def conditioning_inputs(model: onnx.ModelProto) -> tuple[str, ...]:
    """The UNet inputs that stay the same for a whole loop: the context, and SDXL's added conditioning."""
    names = {i.name for i in model.graph.input}
    return ("encoder_hidden_states", *(name for name in ADDED_INPUTS if name in names))


def inpainting_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """The inpainting inputs (name -> channels) when the UNet's sample is wider than its output by them, else none."""
    sample, output = _dims(_input(model.graph, "sample"))[1], _dims(model.graph.output[0])[1]
    extra = sample - output if isinstance(sample, int) and isinstance(output, int) else 0
    if extra == 0:
        return {}
    if extra != sum(INPAINT_CHANNELS.values()):
        from sdrun.errors import UserError

        raise UserError(f"step fusion: the UNet's sample has {sample} channels and its output {output}.",
                        expected=f"equal, or {sum(INPAINT_CHANNELS.values())} more for an inpainting UNet",
                        got=f"{extra} more", fix="export the UNet with `sdcompile export --component unet`")
    return dict(INPAINT_CHANNELS)


def _wrapper_nodes(inner: dict[str, str], conditioning: tuple[str, ...],
                   inpainting: tuple[str, ...] = ()) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Nodes that feed the UNet body, and nodes that consume its output."""
    p = _PREFIX
    first_slot = helper.make_tensor(f"{p}first_slot", TensorProto.INT64, [], [0])
    leading_axis = helper.make_tensor(f"{p}leading_axis", TensorProto.INT64, [1], [0])
    before = [
        helper.make_node("Constant", [], [f"{p}first_slot"], value=first_slot, name=f"{p}first_slot"),
        helper.make_node("Gather", ["state", f"{p}first_slot"], [f"{p}x"], axis=0, name=f"{p}latent"),
        helper.make_node("Mul", ["input_scale", f"{p}x"], [f"{p}x_in"], name=f"{p}input_scale"),
        helper.make_node("Concat", [f"{p}x_in", f"{p}x_in"], [f"{p}cfg_sample" if inpainting else inner["sample"]],
                         axis=0, name=f"{p}cfg_batch"),
        *([helper.make_node("Concat", [f"{p}cfg_sample", *inpainting], [inner["sample"]], axis=1,
                            name=f"{p}inpainting_channels")] if inpainting else []),
        helper.make_node("Identity", ["timestep"], [inner["timestep"]], name=f"{p}timestep"),
        *(helper.make_node("Identity", [name], [inner[name]], name=f"{p}{name}") for name in conditioning),
    ]
    after = [
        helper.make_node("Split", [inner["latent"]], [f"{p}uncond", f"{p}cond"], axis=0, num_outputs=2,
                         name=f"{p}split_cfg"),
        helper.make_node("Sub", [f"{p}cond", f"{p}uncond"], [f"{p}delta"], name=f"{p}cfg_delta"),
        helper.make_node("Mul", ["guidance", f"{p}delta"], [f"{p}scaled_delta"], name=f"{p}cfg_scale"),
        helper.make_node("Add", [f"{p}uncond", f"{p}scaled_delta"], [f"{p}guided"], name=f"{p}cfg"),
        helper.make_node("Constant", [], [f"{p}leading_axis"], value=leading_axis, name=f"{p}leading_axis"),
        helper.make_node("Unsqueeze", [f"{p}guided", f"{p}leading_axis"], [f"{p}y_slot"], name=f"{p}y_slot"),
        helper.make_node("Unsqueeze", ["noise", f"{p}leading_axis"], [f"{p}z_slot"], name=f"{p}z_slot"),
        helper.make_node("Concat", ["state", f"{p}y_slot", f"{p}z_slot"], [f"{p}operands"], axis=0,
                         name=f"{p}operands"),  # (W + 2, B, C, h, w)
        helper.make_node("Flatten", [f"{p}operands"], [f"{p}operand_rows"], axis=1, name=f"{p}operand_rows"),
        helper.make_node("MatMul", ["update", f"{p}operand_rows"], [f"{p}next_rows"], name=f"{p}update"),
        helper.make_node("Shape", ["state"], [f"{p}state_shape"], name=f"{p}state_shape"),
        helper.make_node("Reshape", [f"{p}next_rows", f"{p}state_shape"], [STEP_OUTPUT], name=f"{p}next_state"),
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
    if set(inputs) not in (set(UNET_INPUTS), {*UNET_INPUTS, *ADDED_INPUTS}) or outputs != (UNET_OUTPUT,):
        raise UserError("step fusion needs a UNet graph with conventional I/O.",
                        expected=f"inputs {', '.join(UNET_INPUTS)} (SDXL: and {', '.join(ADDED_INPUTS)}) "
                                 f"-> output {UNET_OUTPUT}",
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
