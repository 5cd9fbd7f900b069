"""The tiny-shapes training script: its smoke run writes a checkpoint the real loading path reads."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.shapes import train
from sdcompile.recipes import load_recipe
from sdcompile.weights import Component, RandomWeights, load_models
from tests.family_twin import cli

SIDECAR_KEYS = {"recipe", "weights", "seed", "config", "data", "losses", "latents", "provenance"}


@pytest.fixture
def torch_threads_restored():
    """`--threads` sets torch's process-wide thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_a_loadable_fp16_checkpoint_and_its_sidecar(tmp_path, torch_threads_restored):
    out = tmp_path / "tiny-shapes.safetensors"
    cli(train.main, "--smoke", "--seed", "1", "--threads", "1", "--out", str(out))
    models = load_models(load_recipe(train.RECIPE), out)
    assert models.report.file_dtypes == ("float16",) and models.report.skipped == () and models.report.filled == ()
    assert out.stat().st_size <= train.WEIGHT_BUDGET_BYTES
    sidecar = json.loads(train.sidecar_path(out).read_text())
    assert set(sidecar) == SIDECAR_KEYS and sidecar["seed"] == 1
    assert sidecar["weights"]["bytes"] == out.stat().st_size
    assert sidecar["provenance"]["commit"]
    for stage in ("vae", "unet"):
        assert sidecar["losses"][stage]["steps"] == train.SMOKE[f"{stage}_steps"]


def test_standardizing_the_latents_keeps_decoding_and_sets_their_statistics(tiny_recipe):
    vae = load_models(tiny_recipe, RandomWeights(2), parts=[Component.VAE]).vae
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8).numpy()
    mean, std = train.encode_posteriors(vae, images, batch=2)
    with torch.no_grad():
        decoded = vae.decode(mean)
    (standard_mean, standard_std), (_, gain) = train.standardized_latents(vae, images, batch=2, target_std=5.0)
    new_mean, new_std = train.encode_posteriors(vae, images, batch=2)
    torch.testing.assert_close(standard_mean, new_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(standard_std, new_std, rtol=1e-4, atol=1e-6)
    per_channel = new_mean.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=1), torch.full((4,), 5.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(new_std, gain[:, None, None] * std, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(new_mean), decoded, rtol=1e-4, atol=1e-4)
