"""diffusers pipeline folders: `unet/`, `vae/`, `text_encoder/` (and SDXL's `text_encoder_2/`), renamed to
our layout by `diffusers_layout`."""
from __future__ import annotations

import json
from pathlib import Path

from sdcompile import diffusers_layout
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import CheckpointStates, Component, StateDict, recipe_components
from sdcompile.weights.load_report import LoadReport, float_dtypes
from sdcompile.weights.safetensors_extent import check_safetensors_extent
from sdcompile.weights.single_file import read_state_dict_file
from sdrun.errors import UserError

DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


def read_diffusers_folder(folder: Path, recipe: Recipe) -> tuple[CheckpointStates, LoadReport]:
    """One subfolder per model of the recipe (unet/, vae/, text_encoder/, …), renamed to our layout."""
    subfolders = {component: folder / component.value for component in recipe_components(recipe)}
    absent = [f"{path.name}/" for path in subfolders.values() if not path.is_dir()]
    if absent:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise UserError(f"{folder} is a directory but not a diffusers pipeline folder.",
                        expected=f"subfolders {', '.join(f'{c.value}/' for c in subfolders)}, each with "
                                 "config.json and weights",
                        got=f"missing {', '.join(absent)}; found {', '.join(found[:10]) or 'nothing'}",
                        fix="pass the folder holding model_index.json, or a single .safetensors/.ckpt file")
    files = {component: component_weight_files(path) for component, path in subfolders.items()}
    # Every header first: a truncated last shard fails before gigabytes of the others are read.
    for path in (path for paths in files.values() for path in paths if path.suffix == ".safetensors"):
        check_safetensors_extent(path)
    raw = {component: read_weight_files(paths) for component, paths in files.items()}
    components = {
        Component.UNET: diffusers_layout.unet_from_diffusers(raw[Component.UNET], recipe.unet),
        Component.VAE: diffusers_layout.vae_from_diffusers(raw[Component.VAE], recipe.vae),
    }
    for component, config in zip((Component.TEXT_ENCODER, Component.TEXT_ENCODER_2), recipe.text_encoders):
        components[component] = diffusers_layout.text_from_hf(raw[component], config)
    return CheckpointStates(components), LoadReport(f"diffusers folder {folder}", float_dtypes(raw.values()))


def component_weight_files(subfolder: Path) -> list[Path]:
    """The weights file of one diffusers/transformers `save_pretrained` folder, or its shards."""
    for name in DIFFUSERS_WEIGHT_FILES:
        index = subfolder / f"{name}.index.json"
        if (subfolder / name).is_file():
            return [subfolder / name]
        if index.is_file():
            return _shard_files(index)
    raise UserError(f"{subfolder} holds no weights file.",
                    expected=" or ".join(DIFFUSERS_WEIGHT_FILES[:2]) + " (or a .bin / sharded equivalent)",
                    got=", ".join(sorted(p.name for p in subfolder.iterdir())) or "an empty folder",
                    fix="save the component with save_pretrained, or download it again")


def _shard_files(index: Path) -> list[Path]:
    try:
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise UserError(f"{index} is not a valid shard index: {err}.", expected='JSON with a "weight_map" table',
                        fix="download the folder again") from None
    shards = [index.parent / Path(name).name for name in shard_names]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise UserError(f"{index} names shards that are not in {index.parent}.",
                        expected=", ".join(shard.name for shard in shards), got=f"missing {', '.join(missing)}",
                        fix="download the folder again")
    return shards


def read_weight_files(paths: list[Path]) -> StateDict:
    state: StateDict = {}
    for path in paths:
        state |= read_state_dict_file(path)
    return state
