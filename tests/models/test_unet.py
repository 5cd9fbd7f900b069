"""UNetModel: checkpoint layout of the real SD 1.x / 2.x UNets, numerics of its parts, shapes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from model_checks import rel_l2
from reference_keys import reference_shapes

from sdcompile.models.attention import AttentionImpl
from sdcompile.models.unet import UNetModel, timestep_embedding
from sdcompile.recipes import load_recipe

ATTENTION_IMPL_REL_L2 = 1e-6  # SDPA vs explicit softmax attention, relative L2 of the UNet output
SAME_MATH_REL_L2 = 1e-6  # two spellings of the same computation (conv 1x1 vs Linear, int vs float t)
CONTEXT_LEN = 77


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
