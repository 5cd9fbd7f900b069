"""Checkpoint reading and writing, seeded random weights, and strict loading into our models.

Sources:
- an ldm single file (`single_file`): `.safetensors`, or a pickled `.ckpt` / `.pt` / `.pth` / `.bin`
  read by a restricted unpickler (`unpickler`) that rebuilds tensors and plain containers and never
  runs code named by the file;
- a diffusers pipeline folder (`diffusers_folder`): `unet/`, `vae/`, `text_encoder/` (SDXL also
  `text_encoder_2/`), renamed by `diffusers_layout`;
- `RandomWeights(seed)` (`random_init`): every parameter drawn from a generator seeded by
  (seed, checkpoint key).

A `.safetensors` header is checked against the file's size first (`safetensors_extent`), so a file cut
short is refused, naming the tensor it cuts, before any tensor is read.

`loading` checks every key strictly (`key_check`) and reports what it skipped or filled in
(`load_report`); `writing` saves our models as an ldm single file.
"""
from sdcompile.weights.layout import LDM_PREFIXES, SDXL_LDM_PREFIXES, Component, ldm_prefixes, recipe_components
from sdcompile.weights.load_report import KeyGroup, LoadReport
from sdcompile.weights.loading import (CheckpointSource, StableDiffusionModels, build_models, load_models,
                                       load_strict_, read_checkpoint, with_filled_keys)
from sdcompile.weights.random_init import RandomWeights, random_tensor, randomize_parameters_
from sdcompile.weights.single_file import read_state_dict_file, unwrap_state_dict
from sdcompile.weights.unpickler import InertStandIn, RefusedGlobal, read_pickled, resolve_global
from sdcompile.weights.writing import ldm_state_dict, save_ldm_checkpoint

__all__ = [
    "LDM_PREFIXES", "SDXL_LDM_PREFIXES", "CheckpointSource", "Component", "InertStandIn", "KeyGroup", "LoadReport",
    "RandomWeights", "RefusedGlobal", "StableDiffusionModels", "build_models", "ldm_prefixes", "ldm_state_dict",
    "load_models", "load_strict_", "random_tensor", "randomize_parameters_", "read_checkpoint", "read_pickled",
    "read_state_dict_file", "recipe_components", "resolve_global", "save_ldm_checkpoint", "unwrap_state_dict",
    "with_filled_keys",
]
