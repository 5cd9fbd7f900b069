"""Diffusers-folder key layout -> our (ldm) key layout, per component.

A diffusers pipeline folder stores each component's state_dict under diffusers' (UNet, VAE) or
transformers' (text encoder) parameter names. The computations are the same as ldm's, so converting is
a rename, plus two reshapes: the VAE attention's linear q/k/v/out weights (C, C) become 1×1 convolution
weights (C, C, 1, 1), and the SD2 text encoder's separate q/k/v projections are stacked into open_clip's
`in_proj_weight` (3·width, width). Block indices are derived from the recipe's configs, so every
recipe (the tiny one included) converts, not only SD's sizes.

The module-name tables are plain strings shared with the runtime (`sdrun.diffusers_names`).
Keys the rename does not recognise pass through unchanged, so that strict loading reports them.

SD2 folders store a 23-layer `CLIPTextModel` (the 24th OpenCLIP block is never run: SD2 reads the
penultimate layer) and no `text_projection` / `logit_scale`. `unused_openclip_fill` supplies those
keys, so strict loading accepts exactly them as missing.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch

from sdcompile.recipes import AutoencoderConfig, TextEncoderConfig, TextEncoderKind, TextOutputLayer, UNetConfig
from sdrun.diffusers_names import (HF_LAYER_PREFIX, OPENCLIP_BLOCK_PREFIX, OPENCLIP_IN_PROJ, OPENCLIP_LAYER_LEAVES,
                                   OPENCLIP_QKV_ORDER, VAE_ATTENTION_CONV_LEAVES, renamed, unet_prefix_table,
                                   vae_prefix_table)

StateDict = dict[str, torch.Tensor]

OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, §2.5)
_HF_QKV = re.compile(rf"{re.escape(HF_LAYER_PREFIX)}(\d+)\.self_attn\.([{OPENCLIP_QKV_ORDER}])_proj\.(weight|bias)")
_HF_LAYER = re.compile(rf"{re.escape(HF_LAYER_PREFIX)}(\d+)\.(.+)")


# --- generic --------------------------------------------------------------------------------------------


def rename_by_prefix(state: Mapping[str, torch.Tensor], table: Mapping[str, str]) -> StateDict:
    """Rename each key by its longest dotted prefix found in `table`; keys without one are kept."""
    return {renamed(key, table): value for key, value in state.items()}


# --- UNet -----------------------------------------------------------------------------------------------


def unet_from_diffusers(state: Mapping[str, torch.Tensor], config: UNetConfig) -> StateDict:
    """`UNet2DConditionModel` state_dict -> ldm `UNetModel` keys (without `model.diffusion_model.`)."""
    return rename_by_prefix(state, unet_prefix_table(config))


# --- VAE ------------------------------------------------------------------------------------------------


def vae_from_diffusers(state: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> StateDict:
    """diffusers `AutoencoderKL` state_dict -> ldm `AutoencoderKL` keys (without `first_stage_model.`)."""
    renamed = rename_by_prefix(state, vae_prefix_table(config))
    return {key: _as_attention_conv(key, value) for key, value in renamed.items()}


def _as_attention_conv(key: str, value: torch.Tensor) -> torch.Tensor:
    """Linear (C_out, C_in) -> 1×1 conv (C_out, C_in, 1, 1) for the VAE attention projections."""
    parts = key.split(".")
    is_projection = len(parts) >= 3 and parts[-3] == "attn_1" and parts[-2] in VAE_ATTENTION_CONV_LEAVES
    if is_projection and parts[-1] == "weight" and value.ndim == 2:
        return value[:, :, None, None]
    return value


# --- text encoders --------------------------------------------------------------------------------------


def text_from_hf(state: Mapping[str, torch.Tensor], config: TextEncoderConfig) -> StateDict:
    """transformers `CLIPTextModel` (or `CLIPTextModelWithProjection`) state_dict -> the layout of the
    recipe's text encoder."""
    if config.kind is TextEncoderKind.CLIP:
        return clip_text_from_hf(state)
    return openclip_text_from_hf(state)


def hf_text_keys_flattened(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop transformers' `text_model.` wrapper (present before transformers 5, absent after)."""
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def clip_text_from_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers `CLIPTextModel` state_dict (either layout) -> SD1 keys `transformer.text_model.…`."""
    return {f"transformer.text_model.{key}": value for key, value in hf_text_keys_flattened(state).items()}


def openclip_text_from_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers `CLIPTextModel` / `CLIPTextModelWithProjection` state_dict (either layout) -> open_clip
    keys `model.…` (SD2, SDXL's second encoder).

    `embeddings.position_ids` (a constant arange buffer) has no open_clip counterpart and is dropped.
    transformers' projection is a bias-free Linear, y = x Wᵀ; open_clip's is a matrix, y = x P: P = Wᵀ.
    """
    flat = hf_text_keys_flattened(state)
    flat.pop("embeddings.position_ids", None)
    projection = flat.pop("text_projection.weight", None)
    qkv = {key: value for key, value in flat.items() if _HF_QKV.fullmatch(key)}
    out = {_openclip_key(key): value for key, value in flat.items() if key not in qkv}
    if projection is not None:
        out["model.text_projection"] = projection.T.contiguous()
    return out | _stacked_in_projections(qkv)


def _openclip_key(hf_key: str) -> str:
    fixed = {
        "embeddings.token_embedding.weight": "model.token_embedding.weight",
        "embeddings.position_embedding.weight": "model.positional_embedding",
        "final_layer_norm.weight": "model.ln_final.weight",
        "final_layer_norm.bias": "model.ln_final.bias",
    }
    if hf_key in fixed:
        return fixed[hf_key]
    layer = _HF_LAYER.fullmatch(hf_key)
    if layer is None:
        return hf_key
    leaf = renamed(layer.group(2), OPENCLIP_LAYER_LEAVES)
    return f"{OPENCLIP_BLOCK_PREFIX}{layer.group(1)}.{leaf}"


def _stacked_in_projections(qkv: Mapping[str, torch.Tensor]) -> StateDict:
    """Per layer, q/k/v projections -> `attn.in_proj_{weight,bias}` stacked along dim 0 (`OPENCLIP_QKV_ORDER`).

    A layer missing one of the three keeps its keys under their original names.
    """
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in qkv:
        layer, letter, kind = _HF_QKV.fullmatch(key).groups()
        groups.setdefault((layer, kind), {})[letter] = key
    out: StateDict = {}
    for (layer, kind), keys in groups.items():
        if set(keys) == set(OPENCLIP_QKV_ORDER):
            stacked = torch.cat([qkv[keys[letter]] for letter in OPENCLIP_QKV_ORDER], dim=0)
            out[f"{OPENCLIP_BLOCK_PREFIX}{layer}.{OPENCLIP_IN_PROJ}_{kind}"] = stacked
        else:
            out |= {key: qkv[key] for key in keys.values()}
    return out


def is_unused_openclip_key(key: str, config: TextEncoderConfig) -> bool:
    """Keys of the OpenCLIP text encoder (our `model.…` layout) that never affect its output; the pooled
    output (SDXL) runs the last block and uses `text_projection`."""
    if key == "model.logit_scale":
        return True
    if config.pooled_output:
        return False
    if key == "model.text_projection":
        return True
    last_block = f"{OPENCLIP_BLOCK_PREFIX}{config.layers - 1}."
    return config.output_layer is not TextOutputLayer.LAST and key.startswith(last_block)


def unused_openclip_fill(expected: Mapping[str, torch.Size], present: Iterable[str],
                         config: TextEncoderConfig) -> StateDict:
    """Values for the unused OpenCLIP keys that `present` lacks: zeros (a zero pre-LN residual block is
    the identity), and CLIP's initial `logit_scale`."""
    have = set(present)
    fill: StateDict = {}
    for key, shape in expected.items():
        if key not in have and is_unused_openclip_key(key, config):
            value = OPENCLIP_LOGIT_SCALE if key == "model.logit_scale" else 0.0
            fill[key] = torch.full(shape, value)
    return fill
