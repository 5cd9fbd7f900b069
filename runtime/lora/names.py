"""LoRA module names -> our checkpoint's weights (ldm single-file layout).

Both layouts name a module by its diffusers / transformers path (kohya joins it with underscores).
The table here is built from the real weight keys of the model: each ldm key is renamed back to its
diffusers path (the inverse of `sdrun.diffusers_names`), so a kohya name is matched against the
underscore-joined real paths, never split by guessing. The UNet's ldm paths name its modules too (kohya's
SDXL files use them: `lora_unet_input_blocks_4_1_…`).

A text encoder is named by transformers' `CLIPTextModel` paths, the OpenCLIP one (SD2, SDXL's second) too:
its `self_attn.{q,k,v}_proj` are row blocks of open_clip's stacked `attn.in_proj_weight`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sdrun.diffusers_names import (CLIP_TEXT_PREFIX, HF_LAYER_PREFIX, OPENCLIP_BLOCK_PREFIX, OPENCLIP_IN_PROJ,
                                   OPENCLIP_LAYER_LEAVES, OPENCLIP_QKV_ORDER, ldm_prefixes, renamed,
                                   unet_prefix_table)
from sdrun.errors import UserError
from sdrun.recipe import Recipe, TextEncoderConfig, TextEncoderKind

WEIGHT = ".weight"
TEXT_MODEL = "text_model."  # transformers' wrapper module (absent from transformers 5 state dicts)
TEXT_MODELS = ("text_encoder", "text_encoder_2")  # the models of `Recipe.text_encoders`, in order
HF_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                    "mlp.fc2")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a module's ΔW goes: weight `key`, whole (`blocks` 1) or its row block `block` of `blocks` equal ones."""

    key: str
    block: int = 0
    blocks: int = 1

    @property
    def unused(self) -> bool:
        """A weight of a block no output reads (an exported graph does not hold it): its delta is dropped."""
        return not self.key


UNUSED = Target("")


def module_table(model: str, ldm_keys: Iterable[str], recipe: Recipe) -> dict[str, Target]:
    """diffusers / transformers module path -> target, for the weights of `model` among `ldm_keys`."""
    prefix = ldm_prefixes(recipe).get(model)
    if prefix is None:
        return {}
    keys = [key[len(prefix):] for key in ldm_keys if key.startswith(prefix)]
    if model == "unet":
        return {path: Target(prefix + key) for path, key in _unet_paths(keys, recipe).items()}
    config = text_encoder_configs(recipe).get(model)
    if config is None:
        return {}
    paths = _clip_paths(keys) if config.kind is TextEncoderKind.CLIP else _openclip_paths(keys)
    paths = _unused_block_paths(config) | paths
    table = {}
    for path, target in paths.items():
        target = target if target.unused else dataclasses.replace(target, key=prefix + target.key)
        table[path] = table[TEXT_MODEL + path] = target
    return table


def text_encoder_configs(recipe: Recipe) -> dict[str, TextEncoderConfig]:
    return dict(zip(TEXT_MODELS, recipe.text_encoders))


def _unused_block_paths(config: TextEncoderConfig) -> dict[str, Target]:
    """The modules of the blocks past those any output reads (SD2's and SDXL's last CLIP block), which a
    LoRA trained on the whole encoder adapts."""
    return {f"{HF_LAYER_PREFIX}{layer}.{module}": UNUSED for layer in range(config.blocks_run, config.layers)
            for module in HF_LAYER_MODULES}


def _unet_paths(keys: list[str], recipe: Recipe) -> dict[str, str]:
    """diffusers module path and ldm module path -> key (without the model's prefix)."""
    inverse = {ldm: diffusers for diffusers, ldm in unet_prefix_table(recipe.unet).items()}
    modules = [key[:-len(WEIGHT)] for key in keys if key.endswith(WEIGHT)]
    table = {module: f"{module}{WEIGHT}" for module in modules}
    return table | {renamed(f"{m}{WEIGHT}", inverse)[:-len(WEIGHT)]: f"{m}{WEIGHT}" for m in modules}


def _clip_paths(keys: list[str]) -> dict[str, Target]:
    """transformers path without `text_model.` -> target, for our `transformer.text_model.…` keys."""
    stem = CLIP_TEXT_PREFIX + TEXT_MODEL
    return {key[len(stem):-len(WEIGHT)]: Target(key) for key in keys if key.startswith(stem) and key.endswith(WEIGHT)}


def _openclip_paths(keys: list[str]) -> dict[str, Target]:
    """transformers path without `text_model.` -> target, for the blocks of our open_clip `model.…` keys."""
    leaves = {f"{ours}{WEIGHT}": f"{theirs}{WEIGHT}" for theirs, ours in OPENCLIP_LAYER_LEAVES.items()}
    table = {}
    for key in keys:
        if not key.startswith(OPENCLIP_BLOCK_PREFIX):
            continue
        layer, _, leaf = key[len(OPENCLIP_BLOCK_PREFIX):].partition(".")
        path = f"{HF_LAYER_PREFIX}{layer}."
        if leaf == f"{OPENCLIP_IN_PROJ}_weight":
            for block, letter in enumerate(OPENCLIP_QKV_ORDER):
                table[f"{path}self_attn.{letter}_proj"] = Target(key, block, len(OPENCLIP_QKV_ORDER))
        elif leaf in leaves:
            table[path + leaves[leaf][:-len(WEIGHT)]] = Target(key)
    return table


def kohya_table(table: dict[str, Target]) -> dict[str, Target | None]:
    """Underscore-joined module path -> target (None where two real paths join alike)."""
    joined: dict[str, Target | None] = {}
    for path, target in table.items():
        name = path.replace(".", "_")
        joined[name] = target if joined.get(name, target) == target else None
    return joined


def check_models_exist(models: Iterable[str], recipe: Recipe, path) -> None:
    """Every model a LoRA adapts is one of the recipe's (a second text encoder is SDXL's)."""
    known = {"unet", *text_encoder_configs(recipe)}
    foreign = sorted(set(models) - known)
    if foreign:
        sdxl = " (lora_te2_ / text_encoder_2. keys are SDXL's second text encoder)" if "text_encoder_2" in foreign \
            else ""
        raise UserError(f"LoRA {path.name} adapts {', '.join(foreign)}, which the {recipe.name} model does not have"
                        f"{sdxl}.", expected=f"modules of {' and '.join(sorted(known))}",
                        fix="use a LoRA made for this model family")
