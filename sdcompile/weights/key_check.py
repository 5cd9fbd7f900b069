"""Strict key checking: missing, unexpected and mis-shaped keys, with hints at the model family."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sdcompile.recipes import Family, Recipe, TextEncoderKind, available_recipes, load_recipe
from sdcompile.weights.layout import Component, StateDict
from sdcompile.weights.load_report import EXAMPLES_SHOWN
from sdrun.errors import UserError
from sdrun.recipe import INPAINT_CHANNELS

CONTINUATION = "\n" + " " * len("  got:      ")  # aligns further lines under the first in UserError.message


@dataclasses.dataclass(frozen=True)
class KeyMismatch:
    component: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    misshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, expected, got)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def lines(self) -> list[str]:
        lines = []
        if self.missing:
            lines.append(f"{self.component}: {len(self.missing)} missing, e.g. {_examples(self.missing)}")
        if self.unexpected:
            lines.append(f"{self.component}: {len(self.unexpected)} unexpected, e.g. {_examples(self.unexpected)}")
        if self.misshaped:
            shown = "; ".join(f"{key} expected {list(want)} got {list(got)}"
                              for key, want, got in self.misshaped[:EXAMPLES_SHOWN])
            lines.append(f"{self.component}: {len(self.misshaped)} mis-shaped, e.g. {shown}")
        return lines


def key_mismatch(component: str, expected: Mapping[str, tuple[int, ...]],
                 given: Mapping[str, tuple[int, ...]]) -> KeyMismatch:
    common = sorted(expected.keys() & given.keys())
    return KeyMismatch(
        component,
        missing=tuple(sorted(expected.keys() - given.keys())),
        unexpected=tuple(sorted(given.keys() - expected.keys())),
        misshaped=tuple((k, expected[k], given[k]) for k in common if expected[k] != given[k]),
    )


def check_keys(modules: Mapping[Component, nn.Module], states: Mapping[Component, StateDict],
               unrecognised: tuple[str, ...], recipe: Recipe, source: str) -> None:
    """Raise a UserError listing missing, unexpected and mis-shaped keys, with a hint at the cause."""
    mismatches = [key_mismatch(c.value, _shapes(m.state_dict()), _shapes(states[c])) for c, m in modules.items()]
    mismatches.append(KeyMismatch("outside the recipe's models", (), tuple(sorted(unrecognised)), ()))
    mismatches = [m for m in mismatches if m]
    if not mismatches:
        return
    counts = [sum(len(getattr(m, field)) for m in mismatches) for field in ("missing", "unexpected", "misshaped")]
    hints = family_hints(states, unrecognised, recipe)
    raise UserError(
        f"{source} does not fit recipe '{recipe.name}': {counts[0]} missing, {counts[1]} unexpected and "
        f"{counts[2]} mis-shaped keys.",
        expected=f"the keys and shapes of recipe '{recipe.name}' ({recipe.description})",
        got=CONTINUATION.join(line for m in mismatches for line in m.lines()),
        fix="; ".join(hints + ["choose the recipe that describes this checkpoint (`sdcompile recipes`)"]))


def family_hints(states: Mapping[Component, StateDict], unrecognised: Iterable[str], recipe: Recipe) -> list[str]:
    """Signs that a checkpoint belongs to another model family than the recipe's."""
    unet = states.get(Component.UNET, {})
    text = states.get(Component.TEXT_ENCODER, {})
    hints = [
        _text_layout_hint(text, recipe),
        _context_width_hint(unet, recipe),
        _projection_hint(unet, recipe),
        _in_channels_hint(unet, recipe),
        _foreign_layout_hint(unrecognised, recipe),
    ]
    return [hint for hint in hints if hint]


def _text_layout_hint(text: StateDict, recipe: Recipe) -> str | None:
    if recipe.text_encoder.kind is TextEncoderKind.OPENCLIP and any(k.startswith("transformer.") for k in text):
        return ("the text encoder is CLIP in Hugging Face layout (`cond_stage_model.transformer.`, SD 1.x) but "
                f"the recipe expects OpenCLIP (`cond_stage_model.model.`): try {_recipes_of(Family.SD1)}")
    if recipe.text_encoder.kind is TextEncoderKind.CLIP and any(k.startswith("model.") for k in text):
        return ("the text encoder is OpenCLIP (`cond_stage_model.model.`, SD 2.x) but the recipe expects CLIP "
                f"(`cond_stage_model.transformer.`): try {_recipes_of(Family.SD2)}")
    return None


def _context_width_hint(unet: StateDict, recipe: Recipe) -> str | None:
    widths = {v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight") and v.ndim == 2}
    if not widths or widths == {recipe.unet.context_dim}:
        return None
    return (f"the UNet cross-attends to context width {sorted(widths)[0]} (768: SD 1.x, 1024: SD 2.x) but the "
            f"recipe's context_dim is {recipe.unet.context_dim}")


def _projection_hint(unet: StateDict, recipe: Recipe) -> str | None:
    ranks = {v.ndim for k, v in unet.items() if k.endswith("proj_in.weight")}
    linear = recipe.unet.use_linear_in_transformer
    if ranks == {2} and not linear:
        return "the UNet's transformer projections are linear (SD 2.x) but the recipe expects 1×1 convolutions"
    if ranks == {4} and linear:
        return "the UNet's transformer projections are 1×1 convolutions (SD 1.x) but the recipe expects linear ones"
    return None


def _in_channels_hint(unet: StateDict, recipe: Recipe) -> str | None:
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4 or conv_in.shape[1] == recipe.unet.in_channels:
        return None
    inpainting = conv_in.shape[1] == recipe.unet.out_channels + sum(INPAINT_CHANNELS.values())
    kind = f" (an inpainting model: try {_inpainting_recipes(recipe.family)})" if inpainting else ""
    return f"the UNet takes {conv_in.shape[1]} input channels{kind}; the recipe has {recipe.unet.in_channels}"


def _inpainting_recipes(family: Family) -> str:
    names = [n for n in available_recipes() if (r := load_recipe(n)).family is family and r.unet.inpainting]
    return ", ".join(names) or "a recipe with unet.in_channels = 9"


def _foreign_layout_hint(unrecognised: Iterable[str], recipe: Recipe) -> str | None:
    keys = list(unrecognised)
    if recipe.family is not Family.SDXL and any(k.startswith("conditioner.") for k in keys):
        return f"keys under `conditioner.` belong to SDXL: try {_recipes_of(Family.SDXL)}"
    if recipe.family is Family.SDXL and any(k.startswith("cond_stage_model.") for k in keys):
        return (f"keys under `cond_stage_model.` belong to SD 1.x / 2.x, not SDXL: try {_recipes_of(Family.SD1)} "
                f"or {_recipes_of(Family.SD2)}")
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")) for k in keys):
        return ("this file holds one component in diffusers layout: pass the pipeline folder (with unet/, vae/, "
                "text_encoder/) instead")
    return None


def _recipes_of(family: Family) -> str:
    names = [name for name in available_recipes() if load_recipe(name).family is family]
    return f"a {family.value} recipe ({', '.join(names)})" if names else f"a {family.value} recipe"


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _examples(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:EXAMPLES_SHOWN]) + (", …" if len(keys) > EXAMPLES_SHOWN else "")
