"""SDXL's conditioning vector y: equal to diffusers' computation and to the UNet's own timestep embedding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompile.models.unet import timestep_embedding
from sdrun.sdxl_conditioning import SIZE_EMBED_DIM, SizeConditioning, conditioning_vector, sinusoidal_embedding
from tests.test_diffusers_parity import SDXL_BASE_DIFFUSERS_CONFIG



def max_abs_for(values: np.ndarray) -> float:
    """fp32 arguments v·f carry ~1 ulp of v of rounding (1.2e-4 at v = 1344), and sin/cos pass it on:
    allow 2 ulp of the largest value (the reference computes in fp32, ours in float64)."""
    return 2 * float(np.spacing(np.float32(np.abs(values).max())))
SIZES = np.array([SizeConditioning(1024, 1024, 0, 0, 1024, 1024), SizeConditioning(768, 1344, 64, 32, 832, 1216)],
                 dtype=np.float32)  # (B, 6)


def diffusers_add_embeds(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """What UNet2DConditionModel with SDXL base's config feeds `add_embedding` (its `text_time` branch)."""
    import diffusers

    with torch.device("meta"):  # add_time_proj has no parameters, so it runs on CPU inputs all the same
        unet = diffusers.UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_CONFIG)
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)  # (B, 6·256)
    return torch.cat([pooled, time_embeds], dim=-1)


def test_conditioning_vector_equals_diffusers():
    pooled = np.random.default_rng(0).standard_normal((2, 1280)).astype(np.float32)
    y = conditioning_vector(pooled, SIZES)
    expected = diffusers_add_embeds(torch.from_numpy(pooled), torch.from_numpy(SIZES)).numpy()
    assert y.shape == (2, SDXL_BASE_DIFFUSERS_CONFIG["projection_class_embeddings_input_dim"]) == expected.shape
    assert y.dtype == np.float32
    error, tolerance = np.abs(y - expected).max(), max_abs_for(SIZES)
    assert error <= tolerance, f"max abs {error:.2e} > {tolerance:.1e}"


def test_one_size_tuple_broadcasts_over_the_batch():
    pooled = np.ones((3, 4), dtype=np.float32)
    y = conditioning_vector(pooled, SizeConditioning.for_image(1024, 768), embed_dim=8)
    assert y.shape == (3, 4 + 6 * 8)
    assert np.array_equal(y[0], y[2]) and np.array_equal(y[:, :4], pooled)


@pytest.mark.parametrize("dim", [SIZE_EMBED_DIM, 5])
def test_sinusoidal_embedding_is_the_unet_timestep_embedding(dim):
    values = np.array([0, 1, 21, 500, 981, 1344], dtype=np.float32)
    expected = timestep_embedding(torch.from_numpy(values), dim).numpy()
    error, tolerance = np.abs(sinusoidal_embedding(values, dim) - expected).max(), max_abs_for(values)
    assert error <= tolerance, f"max abs {error:.2e} > {tolerance:.1e}"
