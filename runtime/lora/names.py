"""LoRA module names -> our checkpoint's weight keys (ldm single-file layout).

Both layouts name a module by its diffusers / transformers path (kohya joins it with underscores).
The table here is built from the real weight keys of the model: each ldm key is renamed back to its
diffusers path (the inverse of `sdrun.diffusers_names`), so a kohya name is matched against the
underscore-joined real paths, never split by guessing.
"""
from __future__ import annotations

from collections.abc import Iterable

from sdrun.diffusers_names import CLIP_TEXT_PREFIX, LDM_PREFIXES, renamed, unet_prefix_table
from sdrun.errors import UserError
from sdrun.recipe import Recipe, TextEncoderKind

WEIGHT = ".weight"
TEXT_MODEL = "text_model."  # transformers' wrapper module (absent from transformers 5 state dicts)


def module_table(model: str, ldm_keys: Iterable[str], recipe: Recipe) -> dict[str, str]:
    """diffusers / transformers module path -> ldm weight key, for the weights of `model` among `ldm_keys`."""
    prefix = LDM_PREFIXES[model]
    modules = [key[len(prefix):-len(WEIGHT)] for key in ldm_keys if key.startswith(prefix) and key.endswith(WEIGHT)]
    if model == "unet":
        inverse = {ldm: diffusers for diffusers, ldm in unet_prefix_table(recipe.unet).items()}
        return {renamed(f"{m}{WEIGHT}", inverse)[:-len(WEIGHT)]: f"{prefix}{m}{WEIGHT}" for m in modules}
    if model == "text_encoder" and recipe.text_encoder.kind is TextEncoderKind.CLIP:
        table = {}
        for m in modules:
            path = m.removeprefix(CLIP_TEXT_PREFIX)
            table[path] = table[path.removeprefix(TEXT_MODEL)] = f"{prefix}{m}{WEIGHT}"
        return table
    return {}


def kohya_table(table: dict[str, str]) -> dict[str, str | None]:
    """Underscore-joined module path -> ldm weight key (None where two real paths join alike)."""
    joined: dict[str, str | None] = {}
    for path, key in table.items():
        name = path.replace(".", "_")
        joined[name] = key if joined.get(name, key) == key else None
    return joined


def check_text_encoder_supported(model: str, recipe: Recipe, path) -> None:
    """The OpenCLIP text encoder (SD2) stacks q/k/v into one `in_proj_weight`: not mapped yet."""
    if model == "text_encoder" and recipe.text_encoder.kind is not TextEncoderKind.CLIP:
        raise UserError(f"LoRA {path.name} adapts the text encoder, and LoRAs for the {recipe.name} OpenCLIP text "
                        "encoder (stacked q/k/v projections) are not supported yet.",
                        fix="use a LoRA trained on the UNet only, or strip its lora_te_ / text_encoder. keys")
