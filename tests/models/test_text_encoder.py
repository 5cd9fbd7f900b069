"""Text encoders: checkpoint keys at real size, attention implementations agree, parity with
transformers' CLIPTextModel (SD1) and open_clip's text tower (SD2) at tiny size with shared weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from model_checks import key_mismatch_report, perturbed_, rel_l2
from reference_keys import reference_shapes

from sdcompile.models.attention import AttentionImpl
from sdcompile.models.text_encoder import CLIPTextEncoder, OpenCLIPTextEncoder, build_text_encoder
from sdcompile.recipes import TextActivation, TextEncoderConfig, TextEncoderKind, TextOutputLayer, TokenizerPadding
from sdcompile.recipes import load_recipe

# SDPA vs EXPLICIT: relative L2 error of the output, computed in float64 so that it measures the
# implementations and not fp32 rounding.
IMPL_AGREEMENT_REL_L2 = 1e-6
PARITY_REL_L2 = 1e-5  # ours vs an independent implementation, fp32, relative L2 error of the output
BATCH = 2

TINY_OPENCLIP = TextEncoderConfig(kind=TextEncoderKind.OPENCLIP, width=32, heads=2, layers=3,
                                  activation=TextActivation.GELU, output_layer=TextOutputLayer.PENULTIMATE,
                                  padding=TokenizerPadding.ZERO)


def tiny_clip_config(output_layer: TextOutputLayer = TextOutputLayer.LAST) -> TextEncoderConfig:
    return dataclasses.replace(load_recipe("tiny").text_encoder, output_layer=output_layer)


def tiny_openclip_config(output_layer: TextOutputLayer = TextOutputLayer.PENULTIMATE) -> TextEncoderConfig:
    return dataclasses.replace(TINY_OPENCLIP, output_layer=output_layer)


def tiny_encoder(config: TextEncoderConfig, impl: AttentionImpl = AttentionImpl.SDPA,
                 dtype: torch.dtype = torch.float32) -> CLIPTextEncoder | OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return perturbed_(build_text_encoder(config, attention=impl), seed=1).to(dtype)


def token_ids(config: TextEncoderConfig, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, config.vocab_size, (BATCH, config.context_length), generator=generator, dtype=dtype)


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("recipe", "section"), [("sd15", "sd1_text"), ("sd21", "sd2_text")])
def test_state_dict_matches_checkpoint_keys_and_shapes(recipe, section):
    with torch.device("meta"):
        model = build_text_encoder(load_recipe(recipe).text_encoder)
    report = key_mismatch_report(shapes_of(model), reference_shapes(section))
    assert not report, f"{recipe} text encoder keys differ from the checkpoint:\n" + report


def test_clip_position_ids_are_a_stored_int64_buffer():
    model = build_text_encoder(tiny_clip_config())
    position_ids = model.state_dict()["transformer.text_model.embeddings.position_ids"]
    assert position_ids.dtype == torch.int64
    assert torch.equal(position_ids, torch.arange(77)[None])


def test_build_picks_the_class_from_the_kind():
    assert isinstance(build_text_encoder(tiny_clip_config()), CLIPTextEncoder)
    assert isinstance(build_text_encoder(tiny_openclip_config()), OpenCLIPTextEncoder)


@pytest.mark.parametrize("config", [tiny_clip_config(), tiny_openclip_config()], ids=["clip", "openclip"])
def test_output_shape_dtype_and_int32_input(config):
    model = tiny_encoder(config)
    with torch.no_grad():
        out64 = model(token_ids(config, torch.int64))
        out32 = model(token_ids(config, torch.int32))
    assert out64.shape == (BATCH, config.context_length, config.width)
    assert out64.dtype == torch.float32
    assert torch.equal(out32, out64)


@pytest.mark.parametrize("config", [tiny_clip_config(), tiny_openclip_config()], ids=["clip", "openclip"])
def test_attention_is_causal(config):
    model = tiny_encoder(config)
    ids = token_ids(config)
    changed = ids.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :40], after[:, :40])
    assert not torch.allclose(before[:, 40:], after[:, 40:])


@pytest.mark.parametrize("config", [tiny_clip_config(), tiny_openclip_config()], ids=["clip", "openclip"])
def test_sdpa_and_explicit_attention_agree(config):
    sdpa, explicit = (tiny_encoder(config, impl, torch.float64) for impl in AttentionImpl)
    ids = token_ids(config)
    with torch.no_grad():
        error = rel_l2(explicit(ids), sdpa(ids))
    assert error <= IMPL_AGREEMENT_REL_L2, f"rel L2 {error:.2e} > {IMPL_AGREEMENT_REL_L2:.0e}"


# --- parity with transformers' CLIPTextModel (SD1) ----------------------------------------------------


def hf_clip_text_model(config: TextEncoderConfig, ours: CLIPTextEncoder):
    """transformers' CLIPTextModel of the same size, holding our weights."""
    import transformers
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.context_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attn_implementation="eager")
    hf_model = transformers.CLIPTextModel(hf_config).eval()
    # transformers >= 5.6 dropped the `text_model.` wrapper from CLIPTextModel's parameter names.
    wrapper = "text_model." if any(k.startswith("text_model.") for k in hf_model.state_dict()) else ""
    weights = {wrapper + k.removeprefix("transformer.text_model."): v for k, v in ours.state_dict().items()
               if not k.endswith("position_ids")}  # a non-persistent buffer in transformers
    hf_model.load_state_dict(weights, strict=True)
    return hf_model


def hf_final_layer_norm(hf_model) -> torch.nn.LayerNorm:
    return hf_model.text_model.final_layer_norm if hasattr(hf_model, "text_model") else hf_model.final_layer_norm


@pytest.mark.parametrize("output_layer", list(TextOutputLayer), ids=lambda o: o.value)
def test_clip_matches_transformers_clip_text_model(output_layer):
    config = tiny_clip_config(output_layer)
    ours = tiny_encoder(config)
    hf_model = hf_clip_text_model(config, ours)
    ids = token_ids(config)
    with torch.no_grad():
        outputs = hf_model(input_ids=ids, output_hidden_states=True)
        expected = {TextOutputLayer.LAST: outputs.last_hidden_state,
                    TextOutputLayer.PENULTIMATE: hf_final_layer_norm(hf_model)(outputs.hidden_states[-2]),
                    TextOutputLayer.PENULTIMATE_HIDDEN: outputs.hidden_states[-2]}[output_layer]
        error = rel_l2(ours(ids), expected)
    assert error <= PARITY_REL_L2, f"rel L2 {error:.2e} > {PARITY_REL_L2:.0e}"


# --- parity with open_clip's text tower (SD2) -----------------------------------------------------------


def open_clip_text_tower(config: TextEncoderConfig, ours: OpenCLIPTextEncoder):
    """open_clip's TextTransformer of the same size (exact GELU), holding our weights."""
    import open_clip
    text_cfg = open_clip.model.CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size,
                                           width=config.width, heads=config.heads, layers=config.layers)
    tower = open_clip.model._build_text_tower(embed_dim=config.width, text_cfg=text_cfg, quick_gelu=False).eval()
    weights = {k.removeprefix("model."): v for k, v in ours.state_dict().items() if k != "model.logit_scale"}
    tower.load_state_dict(weights, strict=True)
    return tower


def open_clip_hidden_states(tower, ids: torch.Tensor, blocks: int, final_norm: bool = True) -> torch.Tensor:
    """What SD2's FrozenOpenCLIPEmbedder computes: embeddings, the first `blocks` resblocks, ln_final
    (SDXL's FrozenOpenCLIPEmbedder2 stops before ln_final)."""
    x = tower.token_embedding(ids) + tower.positional_embedding  # (B, S, width)
    batch_first = getattr(tower.transformer, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)
    for block in tower.transformer.resblocks[:blocks]:
        x = block(x, attn_mask=tower.attn_mask)
    x = x if batch_first else x.transpose(0, 1)
    return tower.ln_final(x) if final_norm else x


@pytest.mark.parametrize("output_layer", list(TextOutputLayer), ids=lambda o: o.value)
def test_openclip_matches_open_clip_text_tower(output_layer):
    config = tiny_openclip_config(output_layer)
    ours = tiny_encoder(config)
    tower = open_clip_text_tower(config, ours)
    blocks = config.layers if output_layer is TextOutputLayer.LAST else config.layers - 1
    final_norm = output_layer is not TextOutputLayer.PENULTIMATE_HIDDEN
    ids = token_ids(config)
    with torch.no_grad():
        error = rel_l2(ours(ids), open_clip_hidden_states(tower, ids, blocks, final_norm))
    assert error <= PARITY_REL_L2, f"rel L2 {error:.2e} > {PARITY_REL_L2:.0e}"


# --- SDXL's second encoder: OpenCLIP bigG with the pooled, projected output --------------------------------

POOLED_OPENCLIP = dataclasses.replace(TINY_OPENCLIP, output_layer=TextOutputLayer.PENULTIMATE_HIDDEN,
                                      pooled_output=True)
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."  # of sd_xl_base_1.0.safetensors


def pooled_token_ids(config: TextEncoderConfig) -> torch.Tensor:
    """Prompts as open_clip tokenizes them: start, words, one <end_of_text> (the largest id), zero padding."""
    ids = torch.zeros(BATCH, config.context_length, dtype=torch.int64)
    generator = torch.Generator().manual_seed(4)
    for row, length in enumerate((5, 30)[:BATCH]):
        ids[row, 0] = config.vocab_size - 2
        ids[row, 1:length] = torch.randint(1, config.vocab_size - 2, (length - 1,), generator=generator)
        ids[row, length] = config.vocab_size - 1
    return ids


def hf_with_projection(config: TextEncoderConfig, ours_state: dict):
    """transformers' CLIPTextModelWithProjection holding our weights, renamed by diffusers' own converter
    from the ldm layout (what diffusers' from_single_file does with SDXL's conditioner.embedders.1)."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, projection_dim=config.width,
        max_position_embeddings=config.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
        attn_implementation="eager")
    model = transformers.CLIPTextModelWithProjection(hf_config).eval()
    checkpoint = {SDXL_BIGG_PREFIX + key.removeprefix("model."): value for key, value in ours_state.items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=SDXL_BIGG_PREFIX)
    wrapper = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    converted = {(k if k.startswith("text_projection") else wrapper + k.removeprefix("text_model.")): v
                 for k, v in converted.items() if not k.endswith("position_ids")}
    return model, converted


def test_sdxl_bigg_has_the_layout_diffusers_single_file_loader_reads():
    """Full size on the meta device: our keys under SDXL's prefix, through diffusers' converter, are
    CLIPTextModelWithProjection's for ViT-bigG/14, each shape equal; only logit_scale is not read."""
    config = load_recipe("sdxl").text_encoder_2
    with torch.device("meta"):
        ours = build_text_encoder(config)
        model, converted = hf_with_projection(config, ours.state_dict())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    report = key_mismatch_report({k: tuple(v.shape) for k, v in converted.items()}, expected)
    assert not report, report
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    read = set(DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].values())
    unread = {k for k in ours.state_dict() if not k.startswith("model.transformer.") and k[6:] not in read}
    assert unread == {"model.logit_scale"}  # CLIP's temperature, which SDXL never uses


def test_sdxl_clip_l_has_the_sd1_text_encoder_layout():
    with torch.device("meta"):
        model = build_text_encoder(load_recipe("sdxl").text_encoder)
    report = key_mismatch_report(shapes_of(model), reference_shapes("sd1_text"))
    assert not report, report


def test_pooled_encoder_matches_open_clip():
    """Hidden states before ln_final of the penultimate block, as SDXL's FrozenOpenCLIPEmbedder2, and the
    pooled projection, as open_clip's text tower computes it (argmax pooling, then text_projection)."""
    ours = tiny_encoder(POOLED_OPENCLIP)
    tower = open_clip_text_tower(POOLED_OPENCLIP, ours)
    ids = pooled_token_ids(POOLED_OPENCLIP)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        errors = {"hidden": rel_l2(hidden, open_clip_hidden_states(tower, ids, POOLED_OPENCLIP.layers - 1, False)),
                  "pooled": rel_l2(pooled, tower(ids))}
    assert max(errors.values()) <= PARITY_REL_L2, f"rel L2 {errors} > {PARITY_REL_L2:.0e}"


def test_pooled_encoder_matches_transformers_with_projection():
    """The same against CLIPTextModelWithProjection, weights renamed by diffusers: hidden_states[-2] and
    text_embeds, what diffusers' SDXL pipeline takes as prompt_embeds and pooled_prompt_embeds."""
    ours = tiny_encoder(POOLED_OPENCLIP)
    model, converted = hf_with_projection(POOLED_OPENCLIP, ours.state_dict())
    model.load_state_dict(converted, strict=False)
    missing = set(model.state_dict()) - set(converted)
    assert all(k.endswith("position_ids") for k in missing), missing
    ids = pooled_token_ids(POOLED_OPENCLIP)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        outputs = model(input_ids=ids, output_hidden_states=True)
        errors = {"hidden": rel_l2(hidden, outputs.hidden_states[-2]), "pooled": rel_l2(pooled, outputs.text_embeds)}
    assert max(errors.values()) <= PARITY_REL_L2, f"rel L2 {errors} > {PARITY_REL_L2:.0e}"


def test_pooled_output_reads_the_end_token_only():
    ours = tiny_encoder(POOLED_OPENCLIP)
    ids = pooled_token_ids(POOLED_OPENCLIP)
    changed = ids.clone()
    changed[0, 10:] = 7  # after row 0's end token (position 5)
    with torch.no_grad():
        (_, before), (_, after) = ours(ids), ours(changed)
    assert before.shape == (BATCH, POOLED_OPENCLIP.width)
    assert torch.equal(before[0], after[0])


@pytest.mark.parametrize("config", [TINY_OPENCLIP, POOLED_OPENCLIP], ids=["penultimate", "pooled"])
def test_only_keys_that_never_reach_the_output_count_as_unused(config):
    """A diffusers folder may omit exactly these (loading fills them), so a pooled encoder must not list
    text_projection or its last block: filled with zeros they would silently change its output."""
    from sdcompile.diffusers_layout import is_unused_openclip_key

    keys = build_text_encoder(config).state_dict()
    expected = {"model.logit_scale"}
    if not config.pooled_output:
        expected |= {"model.text_projection"} | {k for k in keys if k.startswith("model.transformer.resblocks.2.")}
    assert {key for key in keys if is_unused_openclip_key(key, config)} == expected
