"""Parity with diffusers / transformers as independent implementations, through a diffusers pipeline folder.

Each case builds diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`
with configs equivalent to a recipe, randomises them with a seed, saves them as a pipeline folder
(unet/, vae/, text_encoder/), loads that folder with `load_models`, and compares outputs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import pytest
import torch
import transformers

from sdcompile import diffusers_layout
from sdcompile.recipes import Recipe, TextEncoderKind, TextOutputLayer, load_recipe
from sdcompile.weights import Component, build_models, load_models, randomize_parameters_

MAX_RELATIVE_L2 = 1e-5  # ‖ours − theirs‖₂ / ‖theirs‖₂, fp32
GROUP_NORM_GROUPS = 32
SEED = 1234


# The published diffusers config of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), the
# structural entries; everything else is UNet2DConditionModel's default.
SDXL_BASE_DIFFUSERS_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


@dataclasses.dataclass(frozen=True)
class ParityInputs:
    latents: torch.Tensor  # (B, 4, h, w)
    timesteps: torch.Tensor  # (B,)
    context: torch.Tensor  # (B, 77, context_dim)
    images: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    input_ids: torch.Tensor  # (B, 77)


# --- diffusers / transformers models equivalent to a recipe ---------------------------------------------


def diffusers_unet(recipe: Recipe):
    cfg = recipe.unet
    levels = range(len(cfg.channel_mult))
    attention = [cfg.has_attention(level) for level in levels]
    channels = tuple(cfg.model_channels * mult for mult in cfg.channel_mult)
    # diffusers' `attention_head_dim` holds the number of heads per level.
    heads = cfg.num_heads if cfg.num_head_channels == -1 else tuple(c // cfg.num_head_channels for c in channels)
    # Per level; diffusers ignores it where a level has no attention, and its mid block takes the last one.
    depths = tuple(max(cfg.depth_at(level), 1) for level in levels[:-1]) + (cfg.mid_depth,)
    assert cfg.depth_at(levels[-1]) == cfg.mid_depth, "diffusers has no separate mid-block depth"
    sdxl = {"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.size_embed_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels} if cfg.adm_in_channels else {}
    return diffusers.UNet2DConditionModel(
        **sdxl,
        sample_size=recipe.default_height // recipe.vae_scale,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=channels, layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.context_dim, attention_head_dim=heads,
        transformer_layers_per_block=depths, use_linear_projection=cfg.use_linear_in_transformer,
        norm_num_groups=GROUP_NORM_GROUPS, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    )


def diffusers_vae(recipe: Recipe):
    cfg = recipe.vae
    levels = len(cfg.ch_mult)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * mult for mult in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=GROUP_NORM_GROUPS, act_fn="silu",
    )


def hf_text_encoder(recipe: Recipe):
    """SD1: the whole CLIP text model; SD2: the 23-of-24-layer export diffusers stores (penultimate layer)."""
    cfg = recipe.text_encoder
    layers = cfg.layers if cfg.output_layer is TextOutputLayer.LAST else cfg.layers - 1
    config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation.value, layer_norm_eps=1e-5,
    )
    return transformers.CLIPTextModel(config).eval()


@dataclasses.dataclass(frozen=True)
class Reference:
    unet: torch.Tensor
    vae_mean: torch.Tensor
    vae_logvar: torch.Tensor
    vae_decoded: torch.Tensor
    text: torch.Tensor


def write_pipeline_folder(recipe: Recipe, folder: Path, inputs: ParityInputs) -> Reference:
    """Random-weight diffusers models saved as a pipeline folder; returns their outputs on `inputs`."""
    unet = randomize_parameters_(diffusers_unet(recipe).eval(), SEED, "unet.")
    vae = randomize_parameters_(diffusers_vae(recipe).eval(), SEED, "vae.")
    text = randomize_parameters_(hf_text_encoder(recipe), SEED, "text.")
    with torch.no_grad():
        posterior = vae.encode(inputs.images).latent_dist
        reference = Reference(
            unet=unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.context).sample,
            vae_mean=posterior.mean, vae_logvar=posterior.logvar,
            vae_decoded=vae.decode(inputs.latents[:1]).sample,
            text=text(input_ids=inputs.input_ids).last_hidden_state,
        )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return reference


def parity_inputs(recipe: Recipe, latent_size: int, image_size: int, batch: int = 2) -> ParityInputs:
    generator = torch.Generator().manual_seed(SEED)
    ctx = recipe.text_encoder.context_length
    return ParityInputs(
        latents=torch.randn(batch, recipe.unet.in_channels, latent_size, latent_size, generator=generator),
        timesteps=torch.tensor([1.0, 981.0][:batch]),
        context=torch.randn(batch, ctx, recipe.unet.context_dim, generator=generator),
        images=torch.rand(1, 3, image_size, image_size, generator=generator) * 2 - 1,
        input_ids=torch.randint(0, recipe.text_encoder.vocab_size, (batch, ctx), generator=generator),
    )


def relative_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs)).item()


def assert_parity(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    error = relative_l2(ours, theirs)
    assert error <= MAX_RELATIVE_L2, f"{name}: relative L2 {error:.3g} > {MAX_RELATIVE_L2} (would need {error:.3g})"


def check_pipeline_parity(recipe: Recipe, folder: Path, latent_size: int, image_size: int, batch: int = 2):
    inputs = parity_inputs(recipe, latent_size, image_size, batch)
    reference = write_pipeline_folder(recipe, folder, inputs)
    models = load_models(recipe, folder)
    with torch.no_grad():
        posterior = models.vae.encode(inputs.images)
        assert_parity("unet", models.unet(inputs.latents, inputs.timesteps, inputs.context), reference.unet)
        assert_parity("vae encode mean", posterior.mean, reference.vae_mean)
        assert_parity("vae encode logvar", posterior.logvar, reference.vae_logvar)
        assert_parity("vae decode", models.vae.decode(inputs.latents[:1]), reference.vae_decoded)
        assert_parity("text encoder", models.text_encoder(inputs.input_ids), reference.text)
    return models


# --- tests -----------------------------------------------------------------------------------------------


def test_tiny_sd1_pipeline_folder_matches_diffusers(tmp_path, tiny_recipe):
    models = check_pipeline_parity(tiny_recipe, tmp_path, latent_size=8, image_size=64)
    assert models.report.source.startswith("diffusers folder")


def test_tiny_sd2_pipeline_folder_matches_diffusers(tmp_path):
    recipe = load_recipe("tiny-v")
    models = check_pipeline_parity(recipe, tmp_path, latent_size=8, image_size=64)
    filled = {key for group in models.report.filled for key in group.examples}
    assert "model.text_projection" in filled and "model.logit_scale" in filled
    (unused,) = [g for g in models.report.filled if "unused OpenCLIP" in g.reason]
    per_block = 12  # ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj: weight + bias each
    assert unused.count == per_block + 2


def test_diffusers_folder_with_pre_0_14_vae_attention_names(tmp_path, tiny_recipe):
    """Older diffusers saved the VAE attention as query/key/value/proj_attn; both spellings load alike."""
    inputs = parity_inputs(tiny_recipe, latent_size=8, image_size=64)
    write_pipeline_folder(tiny_recipe, tmp_path, inputs)
    current = load_models(tiny_recipe, tmp_path)
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(vae_file)
    for new, old in old_names.items():
        for key in [k for k in state if f".attentions.0.{new}." in k]:
            state[key.replace(f".{new}.", f".{old}.")] = state.pop(key)
    save_file(state, vae_file)
    legacy = load_models(tiny_recipe, tmp_path)
    for key, value in current.vae.state_dict().items():
        assert torch.equal(value, legacy.vae.state_dict()[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_pipeline_folder_matches_diffusers(tmp_path, name):
    check_pipeline_parity(load_recipe(name), tmp_path, latent_size=16, image_size=128, batch=1)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_key_layout_matches_our_models(name):
    """Renamed diffusers keys and shapes equal our models' at SD sizes (built on the meta device: no memory)."""
    recipe = load_recipe(name)
    with torch.device("meta"):
        ours = {component.value: model.state_dict() for component, model in build_models(recipe).items()}
        theirs = {
            "unet": diffusers_layout.unet_from_diffusers(diffusers_unet(recipe).state_dict(), recipe.unet),
            "vae": diffusers_layout.vae_from_diffusers(diffusers_vae(recipe).state_dict(), recipe.vae),
            "text_encoder": diffusers_layout.text_from_hf(hf_text_encoder(recipe).state_dict(), recipe.text_encoder),
        }
    for component, expected in ours.items():
        assert shapes_kept(theirs[component], recipe) == shapes_kept(expected, recipe), component


def shapes_kept(state: dict[str, torch.Tensor], recipe: Recipe) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items() if not filled_on_load(key, recipe)}


def filled_on_load(key: str, recipe: Recipe) -> bool:
    """Keys a diffusers folder may lack: the constant position_ids (transformers >= 5 does not save them)
    and, for OpenCLIP, the keys that never affect the output."""
    if recipe.text_encoder.kind is TextEncoderKind.CLIP:
        return key == "transformer.text_model.embeddings.position_ids"
    return diffusers_layout.is_unused_openclip_key(key, recipe.text_encoder)


@pytest.mark.parametrize("wrapper", ["", "text_model."])
def test_hf_text_layouts_with_and_without_text_model_wrapper(tiny_recipe, wrapper):
    """transformers < 5 saved `text_model.…` keys, later versions flattened them; both convert alike."""
    sd2 = load_recipe("tiny-v")
    for recipe in (tiny_recipe, sd2):
        state = {wrapper + key: value for key, value in hf_text_encoder(recipe).state_dict().items()}
        converted = diffusers_layout.text_from_hf(state, recipe.text_encoder)
        expected = build_models(recipe)[Component.TEXT_ENCODER].state_dict()
        assert shapes_kept(converted, recipe) == shapes_kept(expected, recipe)


def test_openclip_in_projection_stacks_q_k_v_in_order():
    width = 4
    q, k, v = (torch.full((width, width), float(i)) for i in range(3))
    state = {f"encoder.layers.0.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
    stacked = diffusers_layout.openclip_text_from_hf(state)["model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(stacked, torch.cat([q, k, v]))
