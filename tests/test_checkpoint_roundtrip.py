"""Full-size SD 1.5 with random weights survives writing and reading ldm single files bit for bit."""
from __future__ import annotations

import time

import pytest
import torch

from sdcompile.fingerprint import tensor_fingerprint
from sdcompile.recipes import load_recipe
from sdcompile.weights import RandomWeights, ldm_state_dict, load_models, save_ldm_checkpoint

pytestmark = pytest.mark.slow

SD15_TENSORS = 686 + 248 + 197  # UNet, VAE, CLIP text encoder incl. position_ids (sd_checkpoint_keys.txt)
RANDOM_INIT_SECONDS = 120  # generous bound for ~1.07e9 parameters on 2 CPU cores


def fingerprints(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """key -> dtype, shape and sha256 of the bytes, so the models can be freed before reloading."""
    return {key: tensor_fingerprint(value) for key, value in state.items()}


def test_full_size_sd15_round_trips_bit_exactly(tmp_path):
    recipe = load_recipe("sd15")
    start = time.perf_counter()
    models = load_models(recipe, RandomWeights(0))
    assert time.perf_counter() - start < RANDOM_INIT_SECONDS
    expected = fingerprints(ldm_state_dict(models))
    assert len(expected) == SD15_TENSORS
    paths = [save_ldm_checkpoint(models, tmp_path / name) for name in ("sd15.safetensors", "sd15.ckpt")]
    del models
    for path in paths:
        loaded = load_models(recipe, path)
        assert fingerprints(ldm_state_dict(loaded)) == expected, path.name
        del loaded
        path.unlink()
