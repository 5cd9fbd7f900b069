"""The ldm single-file layout: one key prefix per model, which depends on the model family."""
from __future__ import annotations

import dataclasses
import enum

import torch

from sdcompile.recipes import Recipe
from sdrun.diffusers_names import LDM_PREFIXES as LDM_KEY_PREFIXES
from sdrun.diffusers_names import SDXL_LDM_PREFIXES as SDXL_KEY_PREFIXES
from sdrun.diffusers_names import ldm_prefixes as ldm_key_prefixes

StateDict = dict[str, torch.Tensor]


class Component(enum.Enum):
    UNET = "unet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's OpenCLIP ViT-bigG


# SD1 and SD2: three models, the text encoder under `cond_stage_model.`.
LDM_PREFIXES = {Component(name): prefix for name, prefix in LDM_KEY_PREFIXES.items()}
SDXL_LDM_PREFIXES = {Component(name): prefix for name, prefix in SDXL_KEY_PREFIXES.items()}


def ldm_prefixes(recipe: Recipe) -> dict[Component, str]:
    """Key prefix of each of the recipe's models in its family's ldm single file."""
    return {Component(name): prefix for name, prefix in ldm_key_prefixes(recipe).items()}


def recipe_components(recipe: Recipe) -> tuple[Component, ...]:
    """The models a recipe has: UNet, VAE, one text encoder per `recipe.text_encoders`."""
    texts = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)[:len(recipe.text_encoders)]
    return (Component.UNET, Component.VAE, *texts)


@dataclasses.dataclass(frozen=True)
class CheckpointStates:
    """A checkpoint's tensors per component (our key layout, no prefix), plus keys of no component."""

    components: dict[Component, StateDict]
    unrecognised: tuple[str, ...] = ()
