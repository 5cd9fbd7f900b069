"""TensorRT optimization profiles: the min/opt/max input shapes one engine accepts.

Shapes start from the recipe's ranges (batch in prompts, height and width in pixels), take the
user's overrides, and become per-input shapes through the manifest's symbolic dims: the UNet
and text encoder see `cfg_batch` (batch.min up to 2·batch.max, classifier-free guidance
doubling the batch), the UNet and VAE decoder see latent cells (pixels / vae_scale), the UNet's
context spans one to `max_prompt_chunks` 77-token chunks (`context_tokens`). A static profile pins
every level to `opt` (one chunk). Pure: no TensorRT, no files.
"""
from __future__ import annotations

import dataclasses
import enum

from sdcompile.recipes import Recipe, ShapeRange, ShapeRanges
from sdrun.bundle import ShapeBinding, TensorSpec, resolve_shape
from sdrun.engine_files import LEVELS
from sdrun.errors import UserError

AXES = ("batch", "height", "width")


class ShapeMode(enum.Enum):
    DYNAMIC = "dynamic"  # one profile spanning min..max
    STATIC = "static"  # min = opt = max = opt: fastest kernels, one shape only


@dataclasses.dataclass(frozen=True)
class ShapeRequest:
    """The user's profile choices; `overrides[level][axis]` replaces the recipe's value."""

    mode: ShapeMode = ShapeMode.DYNAMIC
    overrides: dict = dataclasses.field(default_factory=dict)  # {"opt": {"batch": 2, "height": 768}}


def parse_shape_override(level: str, text: str | None) -> dict[str, int]:
    """'batch=2,height=768,width=768' -> {'batch': 2, 'height': 768, 'width': 768}."""
    if not text:
        return {}
    values = {}
    for item in text.split(","):
        axis, sep, value = (part.strip() for part in item.partition("="))
        if not sep or axis not in AXES or not value.lstrip("-").isdigit():
            raise UserError(f"cannot read --{level} {text!r}.",
                            expected="AXIS=INT[,AXIS=INT...] with AXIS in " + ", ".join(AXES),
                            got=repr(item.strip()), fix=f"e.g. --{level} batch=2,height=768,width=768")
        values[axis] = int(value)
    return values


def request_ranges(recipe: Recipe, request: ShapeRequest) -> ShapeRanges:
    """The recipe's ranges with overrides applied (static: all levels = opt), validated."""
    _check_static_overrides(request)
    ranges = ShapeRanges(**{axis: _axis_range(recipe, request, axis) for axis in AXES})
    check_ranges(ranges, recipe.size_multiple, request.overrides)
    return ranges


def check_ranges(ranges: ShapeRanges, size_multiple: int, overrides: dict | None = None) -> None:
    """1 <= min <= opt <= max per axis; image sizes multiples of the recipe's size multiple."""
    for axis in AXES:
        rng = getattr(ranges, axis)
        given = _describe_overrides(overrides or {}, axis)
        if rng.min < 1:
            raise UserError(f"{axis} must be at least 1.", got=f"min={rng.min}{given}", fix=f"use {axis} >= 1")
        if not rng.min <= rng.opt <= rng.max:
            raise UserError(f"{axis} must satisfy min <= opt <= max.", got=f"min={rng.min} opt={rng.opt} "
                            f"max={rng.max}{given}", fix=f"adjust --min/--opt/--max {axis}=... so they are ordered")
        bad = [v for v in (rng.min, rng.opt, rng.max) if axis != "batch" and v % size_multiple]
        if bad:
            raise UserError(f"{axis} values must be multiples of {size_multiple} (pixels per latent cell times the "
                            "UNet's downsampling), or the UNet's skip connections do not line up.",
                            got=f"min={rng.min} opt={rng.opt} max={rng.max}{given}",
                            fix=f"round {bad[0]} to {_nearest_multiple(bad[0], size_multiple)}")


def bindings_from_ranges(ranges: ShapeRanges, vae_scale: int, mode: ShapeMode,
                         context: ShapeRange) -> dict[str, ShapeBinding]:
    """Symbol values per level; `cfg_batch` spans batch.min (guidance 1) to 2·batch.max (CFG).

    Static engines serve classifier-free guidance at the opt batch: cfg_batch = 2·batch.opt.
    (`guided_batch`, the step-fused UNet's, is 2·batch at every level by its definition.)
    `context` is the UNet context's token range (`context_range`).
    """
    b, h, w, c = ranges.batch, ranges.height, ranges.width, context
    if mode is ShapeMode.STATIC:
        opt = ShapeBinding(b.opt, 2 * b.opt, h.opt, w.opt, vae_scale, c.opt)
        return {level: opt for level in LEVELS}
    return {"min": ShapeBinding(b.min, b.min, h.min, w.min, vae_scale, c.min),
            "opt": ShapeBinding(b.opt, 2 * b.opt, h.opt, w.opt, vae_scale, c.opt),
            "max": ShapeBinding(b.max, 2 * b.max, h.max, w.max, vae_scale, c.max)}


def context_range(recipe: Recipe) -> ShapeRange:
    """The UNet context's tokens: one chunk (min and opt, what short prompts use) to `max_prompt_chunks`."""
    one = recipe.text_encoder.context_length
    return ShapeRange(one, one, recipe.max_context_tokens)


def shapes_from_bindings(inputs: tuple[TensorSpec, ...], bindings: dict[str, ShapeBinding]) -> dict:
    """Per input name: {"min": [...], "opt": [...], "max": [...]} (the manifest's profile format)."""
    return {t.name: {level: list(resolve_shape(t.dims, bindings[level])) for level in LEVELS} for t in inputs}


def profile_from_request(recipe: Recipe, inputs: tuple[TensorSpec, ...], request: ShapeRequest) -> dict:
    """The engine profile of one component: recipe ranges + overrides -> per-input min/opt/max."""
    ranges = request_ranges(recipe, request)
    bindings = bindings_from_ranges(ranges, recipe.vae_scale, request.mode, context_range(recipe))
    return shapes_from_bindings(inputs, bindings)


def is_static(profile: dict) -> bool:
    return all(levels["min"] == levels["opt"] == levels["max"] for levels in profile.values())


def check_profile_against_graph(component: str, profile: dict, graph_dims: dict[str, tuple]) -> None:
    """Refuse a profile the ONNX graph cannot take: unknown inputs, wrong rank, or a fixed dim changed.

    `graph_dims[name]` holds the graph input's dims: an int where the graph fixes it, a string or
    None where it is dynamic.
    """
    missing = sorted(set(graph_dims) - set(profile))
    if missing:
        raise UserError(f"{component}: the ONNX graph has input(s) {', '.join(missing)} that the manifest does not "
                        "describe.", fix=_reexport(component))
    for name, levels in profile.items():
        if name not in graph_dims:
            raise UserError(f"{component}: the manifest's input {name!r} is not an input of the ONNX graph.",
                            expected=", ".join(graph_dims), got=name,
                            fix=_reexport(component))
        for level in LEVELS:
            _check_dims(component, name, level, levels[level], graph_dims[name])


def _check_dims(component: str, name: str, level: str, shape: list[int], dims: tuple) -> None:
    if len(shape) != len(dims):
        raise UserError(f"{component}: input {name!r} has rank {len(dims)} in the ONNX graph.",
                        expected=f"{len(dims)} dims", got=f"{level} shape {shape}",
                        fix=_reexport(component))
    for axis, (size, dim) in enumerate(zip(shape, dims)):
        if isinstance(dim, int) and dim > 0 and size != dim:
            raise UserError(f"{component}: input {name!r} dim {axis} is fixed to {dim} in the ONNX graph, "
                            f"but the {level} profile asks for {size}.", expected=str(dim), got=str(size),
                            fix="keep that axis at the size the graph was exported with "
                                "(drop the override), or re-export the graph with that axis dynamic")


def _reexport(component: str) -> str:
    return f"re-export it: sdcompile export --component {component} --out BUNDLE ... --force"


def _axis_range(recipe: Recipe, request: ShapeRequest, axis: str) -> ShapeRange:
    base = getattr(recipe.shapes, axis)
    values = {level: request.overrides.get(level, {}).get(axis, getattr(base, level)) for level in LEVELS}
    if request.mode is ShapeMode.STATIC:
        return ShapeRange(values["opt"], values["opt"], values["opt"])
    return ShapeRange(**values)


def _check_static_overrides(request: ShapeRequest) -> None:
    extra = [level for level in ("min", "max") if request.overrides.get(level)]
    if request.mode is ShapeMode.STATIC and extra:
        raise UserError("a static engine has one shape: give it with --opt only.",
                        got=" and ".join(f"--{level}" for level in extra),
                        fix="drop --min/--max, or drop --static for a dynamic profile")


def _describe_overrides(overrides: dict, axis: str) -> str:
    given = [f"--{level} {axis}={overrides[level][axis]}" for level in LEVELS if axis in overrides.get(level, {})]
    return f" (after {', '.join(given)})" if given else ""


def _nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
