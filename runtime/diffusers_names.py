"""diffusers / transformers module names -> our (ldm single-file) module names, as plain strings.

diffusers names the UNet's and VAE's modules by block kind (`down_blocks.0.attentions.0`), ldm by
position (`input_blocks.1.1`); the leaves inside a block mostly agree. The tables below map the
differing module prefixes, with block indices derived from the recipe's configs, so every recipe (the
tiny one included) is covered. Torch-free: the compiler renames diffusers folders with them and the
runtime resolves LoRA module names with them.
"""
from __future__ import annotations

from collections.abc import Mapping

from sdrun.recipe import AutoencoderConfig, Family, Recipe, UNetConfig

# Key prefix of each model in the ldm single-file layout (`model.diffusion_model.input_blocks.0.0.weight`).
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
# SDXL files (sd_xl_base_1.0.safetensors) hold the two text encoders under the conditioner's embedders:
# 0 is CLIP ViT-L (transformers names), 1 OpenCLIP ViT-bigG (open_clip names).
SDXL_LDM_PREFIXES = LDM_PREFIXES | {
    "text_encoder": "conditioner.embedders.0.",
    "text_encoder_2": "conditioner.embedders.1.",
}
# SD1's text encoder: our keys are transformers' `CLIPTextModel` keys under this prefix.
CLIP_TEXT_PREFIX = "transformer."
# The OpenCLIP text encoder's blocks (open_clip names) and the same blocks in transformers' `CLIPTextModel`.
OPENCLIP_BLOCK_PREFIX = "model.transformer.resblocks."
HF_LAYER_PREFIX = "encoder.layers."
# open_clip's attention holds q, k, v in one `attn.in_proj_weight` (3·width, width) and `in_proj_bias`
# (3·width,): row blocks in this order, block i being transformers' `self_attn.{letter}_proj`.
OPENCLIP_IN_PROJ = "attn.in_proj"
OPENCLIP_QKV_ORDER = "qkv"

# diffusers ResnetBlock2D leaf -> ldm ResBlock leaf (UNet).
UNET_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers Attention leaf (current names, then pre-0.14 names) -> ldm AttnBlock leaf (VAE).
VAE_ATTENTION_LEAVES = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
VAE_ATTENTION_CONV_LEAVES = ("q", "k", "v", "proj_out")
# transformers CLIPEncoderLayer leaf -> open_clip ResidualAttentionBlock leaf.
OPENCLIP_LAYER_LEAVES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def ldm_prefixes(recipe: Recipe) -> dict[str, str]:
    """Key prefix of each of the recipe's models in its family's ldm single file."""
    return dict(SDXL_LDM_PREFIXES if recipe.family is Family.SDXL else LDM_PREFIXES)


def renamed(key: str, table: Mapping[str, str]) -> str:
    """`key` with its longest proper dotted prefix found in `table` replaced; unchanged without one."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    return key


def unet_prefix_table(config: UNetConfig) -> dict[str, str]:
    """diffusers module path -> ldm module path, for every UNet module whose name differs."""
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    if config.adm_in_channels:  # SDXL: add_embedding = TimestepEmbedding over [pooled text, size embeddings]
        table |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    table |= _unet_resnet("mid_block.resnets.0", "middle_block.0")
    table |= _unet_resnet("mid_block.resnets.1", "middle_block.2")
    return table | _unet_down_table(config) | _unet_up_table(config)


def has_attention(config: UNetConfig, level: int) -> bool:
    """ldm puts a SpatialTransformer at level `level` when its downsampling factor 2^level is listed
    and the level's transformer depth is not 0."""
    return config.has_attention(level)


def _unet_resnet(diffusers_prefix: str, ldm_prefix: str) -> dict[str, str]:
    return {f"{diffusers_prefix}.{d}": f"{ldm_prefix}.{l}" for d, l in UNET_RESNET_LEAVES.items()}


def _unet_down_table(config: UNetConfig) -> dict[str, str]:
    """input_blocks: 0 is conv_in; per level `num_res_blocks` × [res (+ attention)], then a downsampler."""
    table: dict[str, str] = {}
    index = 0
    levels = len(config.channel_mult)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            index += 1
            table |= _unet_resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            index += 1
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
    return table


def _unet_up_table(config: UNetConfig) -> dict[str, str]:
    """output_blocks: levels reversed, `num_res_blocks + 1` blocks each; the last one of every level
    but the top also upsamples, its Upsample following the attention when there is one."""
    table: dict[str, str] = {}
    index = 0
    for up, level in enumerate(reversed(range(len(config.channel_mult)))):
        attention = has_attention(config, level)
        for j in range(config.num_res_blocks + 1):
            table |= _unet_resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{index}.0")
            table[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == config.num_res_blocks and level > 0:
                table[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return table


def vae_prefix_table(config: AutoencoderConfig) -> dict[str, str]:
    """diffusers module path -> ldm module path, for every VAE module whose name differs."""
    levels = len(config.ch_mult)
    table: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        table |= _vae_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        table |= _vae_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        for d, l in VAE_ATTENTION_LEAVES.items():
            table[f"{side}.mid_block.attentions.0.{d}"] = f"{side}.mid.attn_1.{l}"
    for i in range(levels):
        for j in range(config.num_res_blocks):
            table |= _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for up in range(levels):  # ldm stores the decoder levels full-resolution first: up.0 runs last
        i = levels - 1 - up
        for j in range(config.num_res_blocks + 1):
            table |= _vae_resnet(f"decoder.up_blocks.{up}.resnets.{j}", f"decoder.up.{i}.block.{j}")
        table[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = f"decoder.up.{i}.upsample.conv"
    return table


def _vae_resnet(diffusers_prefix: str, ldm_prefix: str) -> dict[str, str]:
    return {diffusers_prefix: ldm_prefix, f"{diffusers_prefix}.conv_shortcut": f"{ldm_prefix}.nin_shortcut"}
