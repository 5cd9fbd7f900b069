"""UNetModel: checkpoint layout of the real SD 1.x / 2.x UNets, numerics of its parts, shapes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from model_checks import rel_l2, sdxl_added_conditioning
from reference_keys import reference_shapes

from sdcompile import diffusers_layout
from sdcompile.models.attention import AttentionImpl
from sdcompile.models.unet import UNetModel, timestep_embedding
from sdcompile.recipes import load_recipe
from tests.test_diffusers_parity import SDXL_BASE_DIFFUSERS_CONFIG, diffusers_unet

ATTENTION_IMPL_REL_L2 = 1e-6  # SDPA vs explicit softmax attention, relative L2 of the UNet output
SAME_MATH_REL_L2 = 1e-6  # two spellings of the same computation (conv 1x1 vs Linear, int vs float t)
CONTEXT_LEN = 77
PARITY_REL_L2 = 1e-5  # ours vs diffusers' UNet2DConditionModel on the same weights, fp32, relative L2 of the output
SDXL_BASE_UNET_PARAMS = 2_567_463_684  # UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_CONFIG), counted on meta


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter ~ N(0, scale²), seeded; the original zero-initialises several output convs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model.eval()


def tiny_config(sd2: bool = False):
    config = load_recipe("tiny").unet
    if sd2:  # SD2's variant: fixed head width and Linear proj_in/proj_out
        config = dataclasses.replace(config, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)
    return config


def tiny_inputs(batch: int = 2, height: int = 8, width: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    config = tiny_config()
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)  # (B, 4, h, w)
    timesteps = torch.tensor([981.0, 1.0, 500.0, 21.0][:batch])  # (B,)
    context = torch.randn(batch, CONTEXT_LEN, config.context_dim, generator=gen)  # (B, 77, ctx)
    return x, timesteps, context


def shape_report(got: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [f"{k}: got {got[k]}, expected {expected[k]}" for k in sorted(set(got) & set(expected))
                 if got[k] != expected[k]]
    parts = [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
    return "\n".join(f"{name} ({len(items)}):\n  " + "\n  ".join(items[:40]) for name, items in parts if items)


@pytest.mark.parametrize("recipe, reference", [("sd15", "sd1_unet"), ("sd21-base", "sd2_unet"), ("sd21", "sd2_unet")])
def test_state_dict_matches_checkpoint_layout(recipe, reference):
    with torch.device("meta"):
        model = UNetModel(load_recipe(recipe).unet)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = reference_shapes(reference)
    assert got == expected, shape_report(got, expected)


def test_timestep_embedding_golden():
    # dim 4: half = 2, freqs = 10000^(-[0, 1]/2) = [1, 0.01]; layout [cos(t·f), sin(t·f)]
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 4)
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [0.5403023058681398, 0.9999500004166653, 0.8414709848078965, 0.009999833334166664],
        [-0.883849273431478, 0.28366218546322625, -0.46777180532247614, -0.9589242746631385],
    ])
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected, rtol=0, atol=2e-6)


def test_timestep_embedding_odd_dim_pads_zero():
    emb = timestep_embedding(torch.tensor([3.0]), 5)
    assert emb.shape == (1, 5) and emb[0, -1] == 0


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_sdpa_and_explicit_attention_agree(sd2):
    sdpa = randomize(UNetModel(tiny_config(sd2), AttentionImpl.SDPA))
    explicit = UNetModel(tiny_config(sd2), AttentionImpl.EXPLICIT).eval()
    explicit.load_state_dict(sdpa.state_dict())
    inputs = tiny_inputs()
    with torch.no_grad():
        a, b = sdpa(*inputs), explicit(*inputs)
    assert b.abs().mean() > 1e-3, "output is trivially small; random init did not reach every layer"
    assert rel_l2(a, b) <= ATTENTION_IMPL_REL_L2


def test_linear_projection_equals_1x1_conv():
    """SD2's Linear proj_in/proj_out after/before flattening = SD1's 1x1 convs before/after it."""
    conv_cfg = tiny_config(sd2=True)
    conv_model = randomize(UNetModel(dataclasses.replace(conv_cfg, use_linear_in_transformer=False)))
    linear_model = UNetModel(conv_cfg).eval()
    state = {k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
             for k, v in conv_model.state_dict().items()}
    linear_model.load_state_dict(state)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert rel_l2(linear_model(*inputs), conv_model(*inputs)) <= SAME_MATH_REL_L2


def test_output_shape_non_square():
    model = randomize(UNetModel(tiny_config()))
    x, timesteps, context = tiny_inputs(batch=3, height=6, width=10)
    with torch.no_grad():
        out = model(x, timesteps, context)
    assert out.shape == (3, 4, 6, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("timestep", [torch.tensor([400.0]), torch.tensor(400.0), torch.tensor([400])],
                         ids=["shape1", "scalar", "int64"])
def test_single_timestep_broadcasts_over_batch(timestep):
    model = randomize(UNetModel(tiny_config()))
    x, _, context = tiny_inputs(batch=2)
    with torch.no_grad():
        broadcast = model(x, timestep, context)
        per_sample = model(x, torch.full((2,), 400.0), context)
    assert rel_l2(broadcast, per_sample) <= SAME_MATH_REL_L2


# --- SDXL: the real layout on the meta device, parity with diffusers at tiny size ------------------------


def test_sdxl_unet_has_the_layout_diffusers_single_file_loader_reads():
    """Our SDXL keys, prefixed as in sd_xl_base_1.0.safetensors, go through diffusers' own ldm converter
    (`convert_ldm_unet_checkpoint`, what `from_single_file` runs on the released file) and come out as
    exactly the published config's state_dict, every key used once, every shape equal."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ours = UNetModel(load_recipe("sdxl").unet)
        theirs = diffusers.UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_CONFIG)
    checkpoint = {"model.diffusion_model." + key: value for key, value in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(theirs.config))
    got = {k: tuple(v.shape) for k, v in converted.items()}
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert len(converted) == len(checkpoint), "diffusers' converter left some of our keys unread"
    assert got == expected, shape_report(got, expected)
    assert sum(p.numel() for p in ours.parameters()) == SDXL_BASE_UNET_PARAMS
    assert sum(p.numel() for p in theirs.parameters()) == SDXL_BASE_UNET_PARAMS
    # and our own table (diffusers folders, LoRA names) renames the other way to exactly our keys
    renamed = diffusers_layout.unet_from_diffusers(theirs.state_dict(), ours.config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    renamed_shapes = {k: tuple(v.shape) for k, v in renamed.items()}
    assert renamed_shapes == ours_shapes, shape_report(renamed_shapes, ours_shapes)


def diffusers_unet_with_our_weights(recipe_name: str):
    """(ours, diffusers') for a recipe: seeded random diffusers weights, renamed through our key table."""
    recipe = load_recipe(recipe_name)
    theirs = randomize(diffusers_unet(recipe), seed=5)
    ours = UNetModel(recipe.unet).eval()
    ours.load_state_dict(diffusers_layout.unet_from_diffusers(theirs.state_dict(), recipe.unet), strict=True)
    return ours, theirs


@pytest.mark.parametrize("recipe_name", ["tiny", "tiny-v", "tiny-xl"])
def test_tiny_unet_matches_diffusers(recipe_name):
    ours, theirs = diffusers_unet_with_our_weights(recipe_name)
    config = ours.config
    x, timesteps, _ = tiny_inputs(height=8, width=16)
    context = torch.randn(2, CONTEXT_LEN, config.context_dim, generator=torch.Generator().manual_seed(4))
    added, y = sdxl_added_conditioning(config, batch=2) if config.adm_in_channels else ({}, None)
    with torch.no_grad():
        expected = theirs(x, timesteps, encoder_hidden_states=context,
                          added_cond_kwargs=added or None).sample
        got = ours(x, timesteps, context, y) if y is not None else ours(x, timesteps, context)
    assert expected.abs().mean() > 1e-3, "output is trivially small; random init did not reach every layer"
    error = rel_l2(got, expected)
    assert error <= PARITY_REL_L2, f"{recipe_name}: rel L2 {error:.2e} > {PARITY_REL_L2:.0e}"


def test_tiny_xl_levels_follow_the_per_level_depths():
    """transformer_depth [0, 1, 2]: no attention at level 0, 1 and 2 blocks below, the middle takes the last."""
    keys = UNetModel(load_recipe("tiny-xl").unet).state_dict()
    blocks = {key.split(".attn1.")[0] for key in keys if key.endswith("attn1.to_q.weight")}
    depth = {}
    for block in blocks:
        transformer = block.split(".transformer_blocks.")[0]
        depth[transformer] = depth.get(transformer, 0) + 1
    # input_blocks 1-2 are level 0, 4-5 level 1, 7-8 level 2; output_blocks 0-2 level 2, 3-5 level 1, 6-8 level 0
    expected = {f"input_blocks.{i}.1": d for i, d in ((4, 1), (5, 1), (7, 2), (8, 2))}
    expected |= {f"output_blocks.{i}.1": 2 if i < 3 else 1 for i in range(6)} | {"middle_block.1": 2}
    assert depth == expected


def test_y_is_required_exactly_with_adm():
    xl, sd = UNetModel(load_recipe("tiny-xl").unet), UNetModel(tiny_config())
    x, timesteps, _ = tiny_inputs()
    with pytest.raises(ValueError, match="takes y of width 128"):
        xl(x, timesteps, torch.zeros(2, CONTEXT_LEN, 64))
    with pytest.raises(ValueError, match="no label_emb"):
        sd(x, timesteps, torch.zeros(2, CONTEXT_LEN, 32), torch.zeros(2, 128))
