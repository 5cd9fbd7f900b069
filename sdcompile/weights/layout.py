"""The ldm single-file layout: three components, each under its key prefix."""
from __future__ import annotations

import dataclasses
import enum

import torch

from sdrun.diffusers_names import LDM_PREFIXES as LDM_KEY_PREFIXES

StateDict = dict[str, torch.Tensor]


class Component(enum.Enum):
    UNET = "unet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"


LDM_PREFIXES = {component: LDM_KEY_PREFIXES[component.value] for component in Component}


@dataclasses.dataclass(frozen=True)
class CheckpointStates:
    """A checkpoint's tensors per component (our key layout, no prefix), plus keys of no component."""

    components: dict[Component, StateDict]
    unrecognised: tuple[str, ...] = ()
