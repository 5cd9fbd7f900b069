"""Acceptance of the runtime: our eager backend against diffusers, and every graph backend against eager.

All on the tiny recipe with seeded random weights (seed 0), the same prompt and the same initial noise:
- diffusers' StableDiffusionPipeline (DDIM) on the same weights vs our eager torch backend: the decoded
  float images agree within 1e-3 (fp32);
- ONNX Runtime fp32 vs eager torch: every uint8 pixel within 2/255;
- ONNX Runtime fp16 vs eager torch: PSNR >= 30 dB on the uint8 images;
- step-fused vs plain UNet on one backend: final latents within 1e-5 relative L2.
"""
from __future__ import annotations

import dataclasses

import diffusers  # noqa: F401 - the peer; a broken install fails here instead of skipping
import numpy as np
import pytest
import transformers  # noqa: F401 - its text encoder

from sdcompile.recipes import load_recipe
from sdrun.metrics import compare, psnr, ssim

PROMPT = "a lighthouse on a cliff at dawn"
NEGATIVE_PROMPT = "blurry"
STEPS = 10
GUIDANCE = 7.5
SIZE = 64  # pixels; latents 8×8
PEER_MAX_ABS = 1e-3  # decoded float images in [-1, 1], fp32 vs fp32 in another op order
FP32_MAX_PIXEL_STEPS = 2  # uint8 levels: a rounding flip either side of the eager value
FP16_MIN_PSNR_DB = 30.0  # uint8 images over [0, 255]
FUSED_MAX_REL_L2 = 1e-5  # final latents, step-fused vs plain UNet, same backend and precision


def request():
    from sdrun.pipeline import GenerationRequest

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    return GenerationRequest(PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, seed=0, height=SIZE,
                             width=SIZE, init_noise=noise)


@dataclasses.dataclass(frozen=True)
class Run:
    images: np.ndarray  # (1, H, W, 3) uint8
    latents: np.ndarray  # (1, 4, h, w)
    decoded: np.ndarray  # (1, 3, H, W) float32, the VAE output before quantisation


def generate(bundle, backend: str, step_fusion: bool = False) -> Run:
    from sdrun.session import load_pipeline

    result = load_pipeline(bundle, backend, step_fusion=step_fusion).pipeline.generate(request())
    return Run(result.images, result.latents, result.decoded)


@pytest.fixture(scope="module")
def eager(tiny_bundle) -> Run:
    return generate(tiny_bundle, "torch")


def test_diffusers_pipeline_matches_eager_torch(eager, tiny_recipe):
    from benchmarks.peer import diffusers_pipeline_from_models, run_peer
    from sdcompile.weights import RandomWeights, load_models

    pipe = diffusers_pipeline_from_models(load_models(tiny_recipe, RandomWeights(0)), tiny_recipe)
    r = request()
    theirs = run_peer(pipe, PROMPT, NEGATIVE_PROMPT, STEPS, GUIDANCE, r.init_noise, SIZE, SIZE)
    ours = np.clip(eager.decoded, -1.0, 1.0)  # the pipeline clamps its output the same way
    image = compare(ours, theirs, data_range=2.0)
    print(f"\ndiffusers vs eager torch: image max abs {image.max_abs:.3g}, mean abs {image.mean_abs:.3g}, "
          f"PSNR {image.psnr_db:.1f} dB")
    assert theirs.shape == ours.shape == (1, 3, SIZE, SIZE)
    assert image.max_abs <= PEER_MAX_ABS, f"image max abs {image.max_abs:.3g} > {PEER_MAX_ABS}"


def test_onnxruntime_fp32_matches_eager_torch_within_two_levels(eager, tiny_bundle):
    candidate = generate(tiny_bundle, "onnxruntime")
    steps = np.abs(candidate.images.astype(int) - eager.images.astype(int))
    print(f"\nonnxruntime fp32 vs eager torch: max {steps.max()} uint8 levels, {np.count_nonzero(steps)} of "
          f"{steps.size} values differ, PSNR {psnr(eager.images, candidate.images, 255.0):.1f} dB")
    assert steps.max() <= FP32_MAX_PIXEL_STEPS, f"a pixel differs by {steps.max()} levels (needs <= {steps.max()})"


def test_onnxruntime_fp16_reaches_30_db_against_eager_torch(eager, tiny_bundle_fp16):
    candidate = generate(tiny_bundle_fp16, "onnxruntime")
    value = psnr(eager.images, candidate.images, 255.0)
    similarity = ssim(eager.images.transpose(0, 3, 1, 2) / 255.0, candidate.images.transpose(0, 3, 1, 2) / 255.0)
    print(f"\nonnxruntime fp16 vs eager torch: PSNR {value:.1f} dB, SSIM {similarity:.5f}")
    assert value >= FP16_MIN_PSNR_DB, f"PSNR {value:.1f} dB < {FP16_MIN_PSNR_DB} dB"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_step_fused_matches_plain_unet(tiny_bundle, backend):
    plain = generate(tiny_bundle, backend, step_fusion=False)
    fused = generate(tiny_bundle, backend, step_fusion=True)
    error = compare(plain.latents, fused.latents).rel_l2
    print(f"\n{backend} step-fused vs plain: final latents rel L2 {error:.3g}")
    assert error <= FUSED_MAX_REL_L2, f"rel L2 {error:.3g} > {FUSED_MAX_REL_L2}"


# --- the peer's own conversion -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_peer_components_equal_our_models(tiny_recipe, family):
    """diffusers' converters put our weights into models that compute what ours do (rel L2 <= 1e-5)."""
    import torch

    from benchmarks import peer
    from sdcompile.weights import RandomWeights, ldm_state_dict, load_models

    recipe = tiny_recipe if family == "sd1" else load_recipe("tiny-v")
    models = load_models(recipe, RandomWeights(3))
    ldm = ldm_state_dict(models)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, recipe.text_encoder.vocab_size, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, recipe.unet.context_dim, generator=generator)
    timesteps = torch.tensor([1.0, 981.0])
    with torch.no_grad():
        pairs = {
            "text": (models.text_encoder(ids), peer.hf_text_encoder(ldm, recipe)(ids).last_hidden_state),
            "unet": (models.unet(latents, timesteps, context),
                     peer.diffusers_unet(ldm, recipe)(latents, timesteps, encoder_hidden_states=context).sample),
            "vae": (models.vae.decode(latents), peer.diffusers_vae(ldm, recipe).decode(latents).sample),
        }
    for name, (ours, theirs) in pairs.items():
        error = compare(ours.numpy(), theirs.numpy()).rel_l2
        assert error <= 1e-5, f"{family} {name}: rel L2 {error:.3g}"


@pytest.mark.parametrize("recipe_name, index, pad_id", [
    ("tiny", 0, 49407), ("tiny-v", 0, 0), ("tiny-xl", 0, 49407), ("tiny-xl", 1, 0)])
def test_peer_tokenizer_gives_our_token_ids(recipe_name, index, pad_id):
    from benchmarks import peer
    from sdrun.tokenizer import ClipTokenizer

    # No "!": with the pad token "!" (SD2, SDXL's second tokenizer), transformers reads a literal "!" as the
    # pad token (id 0) where open_clip reads "!</w>" (256); diffusers' SD2 and SDXL pipelines share that quirk.
    prompts = [PROMPT, "", "A photo of an astronaut riding a horse, 4k, trending on artstation."]
    ours = ClipTokenizer.from_file(peer.open_clip_vocab_file())(prompts, pad_id, 77).ids
    theirs = peer.clip_tokenizer(load_recipe(recipe_name), index)(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours, theirs)


# --- the SDXL peer on a released-layout file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_xl_file(tmp_path_factory):
    """A tiny-xl single file in sd_xl_base_1.0's layout (text towers written by transformers and open_clip)."""
    from tests.fixtures.released_layout import released_state_dict, write_safetensors

    recipe = load_recipe("tiny-xl")
    return write_safetensors(released_state_dict(recipe, 3), tmp_path_factory.mktemp("tiny-xl") / "tiny-xl.safetensors")


@pytest.fixture(scope="module")
def tiny_xl_peer(tiny_xl_file):
    from safetensors.torch import load_file

    from benchmarks.peer import diffusers_pipeline

    return diffusers_pipeline(load_file(str(tiny_xl_file)), load_recipe("tiny-xl"))


def test_sdxl_peer_components_equal_our_models(tiny_xl_file, tiny_xl_peer):
    """The peer's UNet (with its text_time embedding), VAE and both text encoders, converted by diffusers from
    the file our loader reads, compute what ours do (rel L2 <= 1e-5): hidden states before the final
    LayerNorm of the penultimate layer, bigG's pooled projection, and the UNet given our y for its inputs."""
    import torch

    from benchmarks import peer
    from sdcompile.weights import load_models
    from sdrun.tokenizer import ClipTokenizer
    from tests.models.model_checks import sdxl_added_conditioning

    recipe = load_recipe("tiny-xl")
    models = load_models(recipe, tiny_xl_file)
    tokenizer = ClipTokenizer.from_file(peer.open_clip_vocab_file())
    ids, ids_2 = (torch.from_numpy(tokenizer([PROMPT, ""], pad_id, 77).ids).long() for pad_id in (49407, 0))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, recipe.unet.context_dim, generator=generator)
    added, y = sdxl_added_conditioning(recipe.unet, generator=generator)
    timesteps = torch.tensor([1.0, 981.0])
    with torch.no_grad():
        clip = tiny_xl_peer.text_encoder(ids, output_hidden_states=True)
        bigg = tiny_xl_peer.text_encoder_2(ids_2, output_hidden_states=True)
        hidden_2, pooled_2 = models.text_encoder_2(ids_2)
        pairs = {
            "text_encoder": (models.text_encoder(ids), clip.hidden_states[-2]),
            "text_encoder_2": (hidden_2, bigg.hidden_states[-2]),
            "text_encoder_2 pooled": (pooled_2, bigg.text_embeds),
            "unet": (models.unet(latents, timesteps, context, y),
                     tiny_xl_peer.unet(latents, timesteps, encoder_hidden_states=context,
                                       added_cond_kwargs=added).sample),
            "vae": (models.vae.decode(latents), tiny_xl_peer.vae.decode(latents).sample),
        }
    for name, (ours, theirs) in pairs.items():
        error = compare(ours.numpy(), theirs.numpy()).rel_l2
        print(f"\ntiny-xl {name}: rel L2 {error:.3g}")
        assert error <= 1e-5, f"tiny-xl {name}: rel L2 {error:.3g} > 1e-5"


def test_sdxl_peer_encodes_an_empty_negative_prompt(tiny_xl_peer):
    """As our runtime does, and unlike diffusers' default (`force_zeros_for_empty_prompt`) for a missing one."""
    import torch

    with torch.no_grad():
        _, negative, _, negative_pooled = tiny_xl_peer.encode_prompt(PROMPT, negative_prompt="")
        _, missing, _, missing_pooled = tiny_xl_peer.encode_prompt(PROMPT)
    assert negative.abs().amax() > 0 and negative_pooled.abs().amax() > 0
    assert torch.equal(negative, missing) and torch.equal(negative_pooled, missing_pooled)


def test_sdxl_peer_runs_two_steps(tiny_xl_peer):
    from benchmarks.peer import run_peer

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    images = run_peer(tiny_xl_peer, PROMPT, "", 2, GUIDANCE, noise, SIZE, SIZE)
    assert images.shape == (1, 3, SIZE, SIZE) and np.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
