"""The peer baseline: diffusers' `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) with DDIM,
built offline on our models' weights.

Our ldm-layout state dicts are converted with diffusers' own single-file converters (an independent
implementation of the key mapping), each tokenizer is transformers' CLIP BPE built from open_clip's
vocabulary file, and the scheduler is diffusers' `DDIMScheduler` configured as ldm samples
(uniform "leading" timesteps shifted by one, ᾱ_0 as the final ᾱ_prev). SDXL's text encoders are
transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` with every layer; its pipeline reads their
penultimate hidden states and the second one's projected pooled output itself. Needs torch, diffusers,
transformers and open_clip (the `test` extra).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from sdrun.errors import MissingDependencyError
from sdrun.recipe import Family

GROUP_NORM_GROUPS = 32  # GroupNorm(32, C) throughout the ldm UNet and VAE
BPE_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer: merges that follow the header line
UNUSED_CLIP_KEYS = ("position_ids",)  # constant buffers a HF CLIPTextModel may or may not hold
TOP_LEVEL_TEXT_KEYS = ("text_projection.",)  # beside `text_model` in CLIPTextModelWithProjection, in every version
# Where each family's single file holds its OpenCLIP tower (as diffusers' `create_diffusers_clip_model_from_ldm`
# reads it); each family has at most one.
OPEN_CLIP_PREFIXES = {Family.SD2: "cond_stage_model.model.", Family.SDXL: "conditioner.embedders.1.model."}
# Pipeline argument names of the recipe's text encoders and their tokenizers, in `recipe.text_encoders` order.
TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def import_peer_packages():
    """(torch, diffusers, transformers), or a MissingDependencyError that says how to install them."""
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as err:
        raise MissingDependencyError(err.name or "diffusers", "for the diffusers peer baseline",
                                     "pip install 'sdcompile[test]'") from None
    return torch, diffusers, transformers


# --- configs equivalent to a recipe ----------------------------------------------------------------------


def unet_config(recipe) -> dict:
    """diffusers `UNet2DConditionModel` config of the recipe's ldm UNet (SDXL: with its `text_time` embedding)."""
    cfg = recipe.unet
    levels = range(len(cfg.channel_mult))
    attention = [cfg.has_attention(level) for level in levels]
    channels = [cfg.model_channels * mult for mult in cfg.channel_mult]
    # diffusers' `attention_head_dim` is the number of heads per level (a historical misnomer).
    heads = cfg.num_heads if cfg.num_head_channels == -1 else [c // cfg.num_head_channels for c in channels]
    # Per level; unused where a level has no attention; diffusers' mid block takes the last level's.
    depths = [max(cfg.depth_at(level), 1) for level in levels[:-1]] + [cfg.mid_depth]
    return size_conditioning_config(cfg) | {
        "sample_size": recipe.default_height // recipe.vae_scale,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": channels, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": depths,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": GROUP_NORM_GROUPS, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    }


def size_conditioning_config(cfg) -> dict:
    """SDXL's label_emb as diffusers' `text_time` embedding: pooled text + sinusoidal size values; none without."""
    if not cfg.adm_in_channels:
        return {}
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.size_embed_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels}


def vae_config(recipe) -> dict:
    """diffusers `AutoencoderKL` config; `scaling_factor` divides latents before decoding."""
    cfg = recipe.vae
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * mult for mult in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels, "norm_num_groups": GROUP_NORM_GROUPS, "act_fn": "silu",
        "sample_size": recipe.default_height, "scaling_factor": recipe.latent_scale_factor,
    }


def text_config(cfg, transformers):
    """transformers' config of one text encoder (`TextEncoderConfig`). SD1: the whole CLIP text model; SD2:
    OpenCLIP's first layers−1 blocks (its penultimate output); SDXL: every layer, as its pipeline selects
    `hidden_states[-2]`, and a projection as wide as the text (bigG's 1280)."""
    from sdcompile.recipes import TextOutputLayer

    layers = cfg.layers - 1 if cfg.output_layer is TextOutputLayer.PENULTIMATE else cfg.layers
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation.value, layer_norm_eps=1e-5, projection_dim=cfg.width)


def scheduler_config(recipe) -> dict:
    """DDIM as ldm's sampler runs it: timesteps 1 + k·(T // S), ᾱ_prev of the last step = ᾱ_0."""
    from sdcompile.recipes import Parameterization

    schedule = recipe.schedule
    return {
        "num_train_timesteps": schedule.timesteps, "beta_start": schedule.linear_start,
        "beta_end": schedule.linear_end, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if recipe.parameterization is Parameterization.V else "epsilon",
        "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
    }


# --- weights ----------------------------------------------------------------------------------------------


def diffusers_unet(ldm: dict, recipe, share: bool = False):
    """diffusers' UNet holding the UNet weights of an ldm single-file state dict, renamed by diffusers'
    own converter (strict load).

    `share`: hold `ldm`'s tensors themselves instead of copies (built on the meta device, nothing allocated),
    so a full-size UNet costs no second copy; the peer then changes with them.
    """
    torch, diffusers, _ = import_peer_packages()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = unet_config(recipe)
    with torch.device("meta" if share else "cpu"):
        unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, config), strict=True, assign=share)
    return unet.eval().requires_grad_(False)


def diffusers_vae(ldm: dict, recipe):
    """diffusers' AutoencoderKL holding the VAE weights of an ldm state dict (strict load)."""
    _, diffusers, _ = import_peer_packages()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = vae_config(recipe)
    vae = diffusers.AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True)
    return vae.eval().requires_grad_(False)


def hf_text_encoder(ldm: dict, recipe, index: int = 0):
    """transformers' model of the recipe's text encoder `index` holding its weights from an ldm state dict:
    `CLIPTextModel`, or `CLIPTextModelWithProjection` for a pooled one (SDXL's bigG); OpenCLIP converted."""
    _, _, transformers = import_peer_packages()
    from sdcompile.recipes import TextEncoderKind

    cfg = recipe.text_encoders[index]
    model_class = transformers.CLIPTextModelWithProjection if cfg.pooled_output else transformers.CLIPTextModel
    encoder = model_class(text_config(cfg, transformers))
    if cfg.kind is TextEncoderKind.CLIP:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        state = convert_ldm_clip_checkpoint(ldm)
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        state = convert_open_clip_checkpoint(encoder, ldm, prefix=OPEN_CLIP_PREFIXES[recipe.family])
    load_text_state(encoder, state)
    return encoder.eval().requires_grad_(False)


def load_text_state(encoder, state: dict) -> None:
    """Load keys in whichever layout the installed transformers uses: `text_model.…` (< 5) or flattened (≥ 5).

    Keys the model does not hold (OpenCLIP's unused last block, `text_projection`) are dropped; every
    key it holds, except constant buffers, must be given.
    """
    expected = encoder.state_dict()
    wrapped = any(k.startswith("text_model.") for k in expected)
    renamed = {_text_key(k, wrapped): v for k, v in state.items()}
    kept = {k: v for k, v in renamed.items() if k in expected}
    missing = [k for k in expected if k not in kept and not k.endswith(UNUSED_CLIP_KEYS)]
    if missing:
        raise ValueError(f"text encoder keys missing after conversion: {missing[:5]} ({len(missing)} in all)")
    encoder.load_state_dict(kept, strict=False)


def _text_key(key: str, wrapped: bool) -> str:
    if key.startswith(TOP_LEVEL_TEXT_KEYS):
        return key
    bare = key.removeprefix("text_model.")
    return f"text_model.{bare}" if wrapped else bare


# --- tokenizer -------------------------------------------------------------------------------------------


def clip_tokenizer(recipe, index: int = 0):
    """transformers' CLIP BPE from open_clip's vocabulary file (no download) for the recipe's text encoder
    `index`; SD2 and SDXL's second encoder pad with "!" (id 0), the others with the end token.

    As in diffusers' SD2 and SDXL pipelines, a literal "!" in such a prompt then reads as the pad token (id 0)
    where open_clip (and our runtime) reads "!</w>" (id 256).
    """
    _, _, transformers = import_peer_packages()
    from sdcompile.recipes import TokenizerPadding

    cfg = recipe.text_encoders[index]
    vocab, merges = clip_vocabulary(open_clip_vocab_file())
    pad = "<|endoftext|>" if cfg.padding is TokenizerPadding.END_TOKEN else "!"
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=cfg.context_length)


def open_clip_vocab_file() -> Path:
    try:
        import open_clip.tokenizer
    except ImportError:
        raise MissingDependencyError("open_clip_torch", "for the CLIP vocabulary file",
                                     "pip install open_clip_torch") from None
    return Path(open_clip.tokenizer.default_bpe())


def clip_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merge pairs) as CLIP numbers them: 256 bytes, the same + "</w>", merges, 2 specials."""
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + BPE_MERGES]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


# --- pipeline --------------------------------------------------------------------------------------------


def diffusers_pipeline(ldm: dict, recipe):
    """A `StableDiffusionPipeline`, or a `StableDiffusionXLPipeline` for SDXL (fp32, CPU), on the weights of
    an ldm single-file state dict."""
    _, diffusers, _ = import_peer_packages()
    components = {"vae": diffusers_vae(ldm, recipe), "unet": diffusers_unet(ldm, recipe),
                  "scheduler": diffusers.DDIMScheduler(**scheduler_config(recipe)), **text_components(ldm, recipe)}
    if recipe.family is Family.SDXL:
        # An explicitly given negative prompt, "" included, is encoded as our runtime encodes it, never zeroed.
        pipe = diffusers.StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=False,
                                                   add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_inpaint_pipeline(ldm: dict, recipe):
    """A `StableDiffusionInpaintPipeline` (fp32, CPU, DDIM as `diffusers_pipeline`'s) on an ldm state dict."""
    _, diffusers, _ = import_peer_packages()
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=diffusers_vae(ldm, recipe), unet=diffusers_unet(ldm, recipe),
        scheduler=diffusers.DDIMScheduler(**scheduler_config(recipe)), **text_components(ldm, recipe),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_components(ldm: dict, recipe) -> dict:
    """`text_encoder`, `tokenizer` (and SDXL's `text_encoder_2`, `tokenizer_2`) as pipeline arguments."""
    components = {}
    for index, (encoder, tokenizer) in enumerate(TEXT_SLOTS[:len(recipe.text_encoders)]):
        components[encoder] = hf_text_encoder(ldm, recipe, index)
        components[tokenizer] = clip_tokenizer(recipe, index)
    return components


def diffusers_pipeline_from_models(models, recipe):
    """The same pipeline on the weights of our ldm-layout models."""
    from sdcompile.weights import ldm_state_dict

    return diffusers_pipeline(ldm_state_dict(models), recipe)


def run_peer(pipe, prompt: str, negative: str, steps: int, guidance: float, init_noise: np.ndarray,
             height: int, width: int) -> np.ndarray:
    """(B, 3, H, W) float32 images in [-1, 1] (clamped as the pipeline clamps) from `init_noise` (B, 4, h, w);
    SDXL told original = target size = (height, width), crop (0, 0)."""
    torch, _, _ = import_peer_packages()
    batch = init_noise.shape[0]
    with torch.inference_mode():
        output = pipe(prompt=[prompt] * batch, negative_prompt=[negative] * batch, num_inference_steps=steps,
                      guidance_scale=guidance, eta=0.0, height=height, width=width,
                      latents=torch.from_numpy(np.ascontiguousarray(init_noise, dtype=np.float32)),
                      output_type="np", return_dict=True, **size_conditioning(pipe, height, width))
    images = np.asarray(output.images, dtype=np.float32)  # (B, H, W, 3) in [0, 1]
    return images.transpose(0, 3, 1, 2) * 2.0 - 1.0


def size_conditioning(pipe, height: int, width: int) -> dict:
    """SDXL's six size values as our runtime sets them: original = target = (height, width), crop (0, 0)."""
    if "text_encoder_2" not in pipe.components:
        return {}
    return {"original_size": (height, width), "target_size": (height, width), "crops_coords_top_left": (0, 0)}


def peer_unet_step(unet, sample: np.ndarray, timestep: float, context: np.ndarray) -> np.ndarray:
    """One call of a diffusers UNet: (B, 4, h, w) noise/v prediction for the same inputs as our `unet` graph."""
    torch, _, _ = import_peer_packages()
    with torch.inference_mode():
        t = torch.tensor(timestep, dtype=torch.float32)
        output = unet(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context))
    return output.sample.numpy()


class DiffusersUNetRunner:
    """The peer's UNet behind our runner protocol: the `unet` graph's feeds in, {"latent": ...} out."""

    def __init__(self, unet):
        self.unet = unet

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"latent": peer_unet_step(self.unet, feeds["sample"], float(feeds["timestep"][0]),
                                         feeds["encoder_hidden_states"])}
