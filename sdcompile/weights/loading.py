"""Strict loading of the recipe's models (UNet, VAE, one or two text encoders) from a checkpoint, a diffusers folder or seeded random weights.

Every key our models hold must come from the source with the same shape, and every key of the
source must be used, except known extras (EMA copy, DDPM schedule buffers, non-tensor entries),
which are skipped and listed in the load report. Two kinds of keys may be absent and are filled:
the SD1 text encoder's constant `position_ids` buffer, and the OpenCLIP keys that never affect
SD2's output (the last block, `text_projection`, `logit_scale`; a diffusers SD2 folder has none), and
SDXL's `logit_scale`, which a diffusers folder does not store either.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sdcompile import diffusers_layout
from sdcompile.models.attention import AttentionImpl
from sdcompile.models.autoencoder import AutoencoderKL
from sdcompile.models.text_encoder import build_text_encoder
from sdcompile.models.unet import UNetModel
from sdcompile.recipes import Recipe, TextEncoderConfig, TextEncoderKind
from sdcompile.weights.diffusers_folder import read_diffusers_folder
from sdcompile.weights.key_check import check_keys
from sdcompile.weights.layout import (LDM_PREFIXES, CheckpointStates, Component, StateDict, ldm_prefixes,
                                      recipe_components)
from sdcompile.weights.load_report import KeyGroup, LoadReport
from sdcompile.weights.random_init import RandomWeights, randomize_parameters_
from sdcompile.weights.single_file import read_ldm_file
from sdrun.errors import UserError

# Constant buffers our models compute themselves; a file may lack them or hold a damaged copy.
CONSTANT_BUFFERS = frozenset({"transformer.text_model.embeddings.position_ids"})
CheckpointSource = str | os.PathLike | RandomWeights


@dataclasses.dataclass(frozen=True)
class StableDiffusionModels:
    """The recipe's models; one not asked for (`load_models(parts=...)`) is None."""

    unet: UNetModel | None
    vae: AutoencoderKL | None
    text_encoder: nn.Module | None
    report: LoadReport
    text_encoder_2: nn.Module | None = None  # SDXL's second encoder; None for a recipe without one
    # Key prefix of each model in the recipe family's ldm single file (`ldm_prefixes`).
    prefixes: Mapping[Component, str] = dataclasses.field(default_factory=lambda: dict(LDM_PREFIXES))

    def component(self, component: Component) -> nn.Module:
        return getattr(self, component.value)


def load_models(recipe: Recipe, source: CheckpointSource | None = None, dtype: torch.dtype = torch.float32,
                attention: AttentionImpl = AttentionImpl.SDPA,
                parts: Sequence[Component] | None = None) -> StableDiffusionModels:
    """The recipe's models in eval mode with weights from `source` (None: `RandomWeights()`).

    `parts` (None: all of the recipe's) builds and fills only those models, so an export can hold one model's
    weights at a time; random weights are the same whichever parts are asked for.
    """
    source = RandomWeights() if source is None else source
    modules = build_models(recipe, attention, parts)
    prefixes = ldm_prefixes(recipe)
    if isinstance(source, RandomWeights):
        for component, module in modules.items():
            randomize_parameters_(module, source.seed, prefixes[component])
        report = LoadReport(f"random weights (seed {source.seed})")
    else:
        states, report = read_checkpoint(Path(source), recipe)
        states = dataclasses.replace(states, components={c: s for c, s in states.components.items() if c in modules})
        report = load_strict_(modules, states, recipe, report)
    for module in modules.values():
        module.to(dtype).eval().requires_grad_(False)
    return StableDiffusionModels(modules.get(Component.UNET), modules.get(Component.VAE),
                                 modules.get(Component.TEXT_ENCODER), report, modules.get(Component.TEXT_ENCODER_2),
                                 prefixes)


def build_models(recipe: Recipe, attention: AttentionImpl = AttentionImpl.SDPA,
                 parts: Sequence[Component] | None = None) -> dict[Component, nn.Module]:
    """The recipe's models (`recipe_components`), or those of them in `parts`, with uninitialised weights."""
    builders = {
        Component.UNET: lambda: UNetModel(recipe.unet, attention),
        Component.VAE: lambda: AutoencoderKL(recipe.vae, attention),
        Component.TEXT_ENCODER: lambda: build_text_encoder(recipe.text_encoder, attention),
        Component.TEXT_ENCODER_2: lambda: build_text_encoder(recipe.text_encoder_2, attention),
    }
    return {part: builders[part]() for part in recipe_components(recipe) if parts is None or part in parts}


def text_encoder_config(recipe: Recipe, component: Component) -> TextEncoderConfig | None:
    """The config of a text-encoder component; None for the UNet and VAE."""
    configs = dict(zip((Component.TEXT_ENCODER, Component.TEXT_ENCODER_2), recipe.text_encoders))
    return configs.get(component)


def read_checkpoint(path: Path, recipe: Recipe) -> tuple[CheckpointStates, LoadReport]:
    """Per-component tensors (our key layout) from an ldm file or a diffusers folder, and what was skipped."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist.",
                        expected="a .safetensors or .ckpt file, or a diffusers folder with unet/, vae/, "
                        "text_encoder/ (and text_encoder_2/ for SDXL)",
                        got=str(path), fix="check the path")
    if path.is_dir():
        return read_diffusers_folder(path, recipe)
    return read_ldm_file(path, recipe)


def load_strict_(modules: Mapping[Component, nn.Module], states: CheckpointStates, recipe: Recipe,
                 report: LoadReport) -> LoadReport:
    """Copy `states` into `modules` after checking keys and shapes; returns `report` plus what was filled."""
    filled: list[KeyGroup] = []
    ready = {}
    for component, module in modules.items():
        expected = module.state_dict()
        state, fills = with_filled_keys(component, states.components.get(component, {}), expected, recipe)
        ready[component] = state
        filled += [KeyGroup.of(f"{component.value} {reason}", keys) for reason, keys in fills.items() if keys]
    check_keys(modules, ready, states.unrecognised, recipe, report.source)
    for component, module in modules.items():
        module.load_state_dict(ready[component], strict=True)
    return dataclasses.replace(report, filled=tuple(filled))


def with_filled_keys(component: Component, state: StateDict, expected: Mapping[str, torch.Tensor],
                     recipe: Recipe) -> tuple[StateDict, dict[str, list[str]]]:
    """`state` with constant buffers taken from the model and absent unused OpenCLIP keys filled.

    Returns the state and, per reason, the keys filled in or replaced.
    """
    constants = {key: expected[key] for key in CONSTANT_BUFFERS if key in expected}
    fills = {
        "constant buffers absent from the source": [key for key in constants if key not in state],
        "constant buffers replaced by their computed values": [
            key for key in constants if key in state and not _same_values(state[key], constants[key])],
    }
    out = dict(state) | constants
    text = text_encoder_config(recipe, component)
    if text is not None and text.kind is TextEncoderKind.OPENCLIP:
        shapes = {key: value.shape for key, value in expected.items()}
        unused = diffusers_layout.unused_openclip_fill(shapes, state, text)
        out |= unused
        fills["unused OpenCLIP keys absent from the source"] = list(unused)
    return out, fills


def _same_values(given: torch.Tensor, computed: torch.Tensor) -> bool:
    return given.shape == computed.shape and torch.equal(given.to(computed.dtype), computed)
