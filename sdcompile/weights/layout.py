"""The ldm single-file layout: three components, each under its key prefix."""
from __future__ import annotations

import dataclasses
import enum

import torch

StateDict = dict[str, torch.Tensor]


class Component(enum.Enum):
    UNET = "unet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"


LDM_PREFIXES = {
    Component.UNET: "model.diffusion_model.",
    Component.VAE: "first_stage_model.",
    Component.TEXT_ENCODER: "cond_stage_model.",
}


@dataclasses.dataclass(frozen=True)
class CheckpointStates:
    """A checkpoint's tensors per component (our key layout, no prefix), plus keys of no component."""

    components: dict[Component, StateDict]
    unrecognised: tuple[str, ...] = ()
