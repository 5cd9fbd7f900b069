"""Writing our models as an ldm single file (`.safetensors`, or a torch.save `.ckpt`)."""
from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch

from sdcompile.weights.layout import StateDict
from sdcompile.weights.loading import StableDiffusionModels
from sdcompile.weights.single_file import PICKLE_SUFFIXES
from sdrun.atomic import write_atomic
from sdrun.errors import UserError


def ldm_state_dict(models: StableDiffusionModels) -> StateDict:
    """All weights under their family's ldm single-file keys (`model.diffusion_model.…`, …)."""
    return {
        prefix + key: value.detach().contiguous()
        for component, prefix in models.prefixes.items()
        for key, value in models.component(component).state_dict().items()
    }


def save_ldm_checkpoint(models: StableDiffusionModels, path: str | os.PathLike) -> Path:
    """Write an ldm single file: `.safetensors`, or `.ckpt` / `.pt` / `.pth` as torch.save({"state_dict": …}).

    Written to a temporary name first and renamed, so a failed write leaves no partial checkpoint.
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"cannot write a checkpoint named {path.name}.",
                        expected=f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}", got=path.suffix or "no suffix",
                        fix="name the output file with one of those suffixes")
    state = ldm_state_dict(models)
    if path.suffix == ".safetensors":
        write_atomic(path, lambda temp: safetensors.torch.save_file(state, str(temp), metadata={"format": "pt"}))
    else:
        write_atomic(path, lambda temp: torch.save({"state_dict": state}, temp))
    return path
