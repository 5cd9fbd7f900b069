"""AutoencoderKL: checkpoint keys at real size, attention implementations agree, posterior semantics."""
from __future__ import annotations

import pytest
import torch
from model_checks import key_mismatch_report, perturbed_, rel_l2
from reference_keys import reference_shapes

from sdcompile.models.attention import AttentionImpl
from sdcompile.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, Downsample
from sdcompile.recipes import load_recipe

# SDPA vs EXPLICIT: relative L2 error of the output, computed in float64 so that it measures the
# implementations and not fp32 rounding accumulated through the network.
IMPL_AGREEMENT_REL_L2 = 1e-6


def tiny_vae(impl: AttentionImpl, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    torch.manual_seed(0)
    return perturbed_(AutoencoderKL(load_recipe("tiny").vae, attention=impl), seed=1).to(dtype)


def test_state_dict_matches_checkpoint_keys_and_shapes():
    with torch.device("meta"):
        model = AutoencoderKL(load_recipe("sd15").vae)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = key_mismatch_report(ours, reference_shapes("vae"))
    assert not report, "VAE keys differ from the checkpoint:\n" + report


def test_decoder_up_0_is_the_full_resolution_level():
    config = load_recipe("tiny").vae
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert model.decoder.up[0].block[-1].conv2.out_channels == config.ch * config.ch_mult[0]
    assert isinstance(model.decoder.up[0].upsample, torch.nn.Identity)
    assert not isinstance(model.decoder.up[-1].upsample, torch.nn.Identity)


def test_latent_and_image_shapes():
    config = load_recipe("tiny").vae
    model = tiny_vae(AttentionImpl.SDPA)
    with torch.no_grad():
        posterior = model.encode(torch.randn(2, 3, 32, 48))
        image = model.decode(torch.randn(2, config.embed_dim, 4, 6))
    assert posterior.mean.shape == (2, config.embed_dim, 4, 6)
    assert image.shape == (2, config.out_ch, 32, 48)


def posterior_moments(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    posterior = model.encode(x)
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


@pytest.mark.parametrize(("run", "input_shape"), [(posterior_moments, (2, 3, 32, 32)),
                                                  (AutoencoderKL.decode, (2, 4, 4, 4))], ids=["encode", "decode"])
def test_sdpa_and_explicit_attention_agree(run, input_shape):
    sdpa, explicit = (tiny_vae(impl, torch.float64) for impl in (AttentionImpl.SDPA, AttentionImpl.EXPLICIT))
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        error = rel_l2(run(explicit, x), run(sdpa, x))
    assert error <= IMPL_AGREEMENT_REL_L2, f"rel L2 {error:.2e} > {IMPL_AGREEMENT_REL_L2:.0e}"


def test_posterior_clamps_logvar_and_samples_with_given_noise():
    mean = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1)
    raw_logvar = torch.tensor([-100.0, 0.0, 100.0]).reshape(1, 3, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, raw_logvar], dim=1))
    noise = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)

    assert torch.equal(posterior.logvar.flatten(), torch.tensor([-30.0, 0.0, 20.0]))
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))
    assert torch.equal(posterior.mode(), mean)
    assert torch.allclose(posterior.sample(noise), mean + posterior.std * noise)
    assert torch.equal(posterior.sample(torch.zeros_like(noise)), mean)


def one_tap_downsample(row: int, col: int) -> Downsample:
    """A 1-channel Downsample whose output copies tap (row, col) of each 3×3 window."""
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, row, col] = 1.0
        down.conv.bias.zero_()
    return down


def test_downsample_pads_right_and_bottom_only():
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        top_left, bottom_right = one_tap_downsample(0, 0)(x), one_tap_downsample(2, 2)(x)
    assert top_left.shape == (1, 1, 2, 2)
    # No left/top padding: the window of output (i, j) starts at input (2i, 2j).
    assert torch.equal(top_left, x[:, :, ::2, ::2])
    # Right/bottom padding: the last row and column of windows reach one zero past the input.
    expected = torch.tensor([[x[0, 0, 2, 2], 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    assert torch.equal(bottom_right, expected)
