"""Inpainting through the public CLI: parity with diffusers on a 9-channel twin, latent blending on an ordinary
model, the step-fused loop against the plain one under every sampler, and bad inputs.

The tiny-inpainting twin is a released-layout single file exported through `sdcompile export` once per session
(`released_twin`); the ordinary model is the tiny fp32 bundle (`tiny_bundle`).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from sdcompile.recipes import load_recipe
from sdrun.metrics import compare
from sdrun.samplers import SAMPLERS
from tests.family_twin import cli
from tests.sdrun_exit import sdrun

PROMPT, NEGATIVE_PROMPT = "a red door in a white wall", "blurry"
SIZE, STEPS, GUIDANCE = 64, 10, 7.5
PEER_MAX_ABS = 1e-3  # decoded float images in [-1, 1], fp32 against fp32 in another op order
KEPT_MAX_LEVELS = 2  # pixels far from the mask: at most 2/255 from the input
FAR = 8  # pixels from the mask's edge that count as far from it
FUSED_MAX_REL_L2 = 1e-5
FUSED_SIZE, FUSED_STEPS = 32, 4


def mask_array(size: int = SIZE) -> np.ndarray:
    """(size, size) uint8: a white (repaint) rectangle on black."""
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 8:5 * size // 8] = 255
    return mask


def far_from_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels more than FAR pixels from every repainted pixel."""
    rows, cols = np.nonzero(mask >= 128)
    near = np.zeros(mask.shape, bool)
    near[max(rows.min() - FAR, 0):rows.max() + FAR + 1, max(cols.min() - FAR, 0):cols.max() + FAR + 1] = True
    return ~near


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint")
    pixels = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    paths = {"image": folder / "image.png", "mask": folder / "mask.png", "empty": folder / "empty.png",
             "wide": folder / "wide.png", "noise": folder / "noise.npy", "folder": folder}
    Image.fromarray(pixels).save(paths["image"])
    Image.fromarray(mask_array()).save(paths["mask"])
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(paths["empty"])
    Image.fromarray(mask_array(2 * SIZE)).save(paths["wide"])  # the same region at twice the size
    np.save(paths["noise"], np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32))
    return paths


def inpaint(bundle, files, out, *extra: str) -> np.ndarray:
    """`sdrun inpaint` through the CLI; the PNG it wrote, (H, W, 3) uint8."""
    from sdrun.cli import main

    cli(main, "inpaint", "--bundle", str(bundle), "--image", str(files["image"]), "--mask", str(files["mask"]),
        "--prompt", PROMPT,
        "--negative-prompt", NEGATIVE_PROMPT, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--sampler", "ddim", "--init-noise", str(files["noise"]), "--out", str(out), "--quiet",
        "--backend", "onnxruntime", *extra)
    return np.asarray(Image.open(out).convert("RGB"))


def peer_inpaint(twin, files) -> np.ndarray:
    """diffusers' StableDiffusionInpaintPipeline (DDIM) on the twin's file: (H, W, 3) float in [0, 1].

    Its masked-image latents are its own VAE's posterior mean, as ours (it would draw a torch sample)."""
    import torch

    from benchmarks.peer import diffusers_inpaint_pipeline

    pipe = diffusers_inpaint_pipeline(load_file(str(twin.file)), load_recipe(twin.recipe_name))
    image, mask = Image.open(files["image"]), Image.open(files["mask"])
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE)
        region = pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE)
        masked = pipe.vae.encode(pixels * (region < 0.5)).latent_dist.mode() * pipe.vae.config.scaling_factor
        output = pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, image=image, mask_image=mask,
                      masked_image_latents=masked, height=SIZE, width=SIZE, strength=1.0,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                      latents=torch.from_numpy(np.load(files["noise"])), output_type="np")
    return np.asarray(output.images[0], dtype=np.float32)


def test_inpainting_model_matches_diffusers_on_the_same_file(released_twin, files, tmp_path):
    """Ours through the CLI equals diffusers' pipeline laid over the input as ours is (the mask as alpha);
    the decoded image before that overlay equals diffusers' output everywhere."""
    from sdrun.images import model_image
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    twin = released_twin("tiny-inpainting")
    ours = inpaint(twin.bundle, files, tmp_path / "ours.png")
    theirs = peer_inpaint(twin, files)
    original = np.asarray(Image.open(files["image"]), np.float32) / 255.0
    repaint = (mask_array() >= 128)[..., None]
    overlaid = np.round(np.where(repaint, theirs, original) * 255.0)
    levels = np.abs(ours.astype(np.float64) - overlaid)
    print(f"\nPNG vs diffusers overlaid: max {levels.max():.0f} levels, {np.mean(levels > 0):.2%} of values differ")
    assert levels.max() <= 1, "PNG levels differ by more than rounding"

    pipeline = load_pipeline(twin.bundle, "onnxruntime", img2img=True).pipeline
    request = GenerationRequest(PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="ddim",
                                height=SIZE, width=SIZE, init_noise=np.load(files["noise"]), strength=1.0,
                                image=model_image(np.asarray(Image.open(files["image"]))),
                                mask=(mask_array() / 255.0).astype(np.float32)[None, None])
    decoded = np.clip(pipeline.generate(request).decoded[0].transpose(1, 2, 0), -1.0, 1.0)
    image = compare(decoded, theirs * 2.0 - 1.0, data_range=2.0)
    print(f"decoded vs diffusers: max abs {image.max_abs:.3g}, PSNR {image.psnr_db:.1f} dB")
    assert image.max_abs <= PEER_MAX_ABS, f"image max abs {image.max_abs:.3g} > {PEER_MAX_ABS}"


def test_ordinary_model_keeps_the_input_outside_the_mask(tiny_bundle, files, tmp_path):
    """Latent blending on a 4-channel UNet: far from the mask the PNG is the input (the overlay), inside it is
    repainted; the raw VAE output's distance from the input there is printed (a random VAE is no identity)."""
    ours = inpaint(tiny_bundle, files, tmp_path / "ours.png").astype(np.int64)
    original = np.asarray(Image.open(files["image"])).astype(np.int64)
    far, repaint = far_from_mask(mask_array()), mask_array() >= 128
    kept = np.abs(ours - original)[far].max()
    changed = np.mean(np.abs(ours - original)[repaint] > KEPT_MAX_LEVELS)
    print(f"\nfar from the mask: max {kept} levels from the input; {changed:.1%} of repainted values changed")
    assert kept <= KEPT_MAX_LEVELS
    assert changed > 0.5


@pytest.fixture(scope="module", params=["tiny", "tiny-inpainting"])
def fused_and_plain(request, released_twin):
    from sdrun.session import load_pipeline

    bundle = (request.getfixturevalue("tiny_bundle") if request.param == "tiny"
              else released_twin(request.param).bundle)
    return {fused: load_pipeline(bundle, "onnxruntime", step_fusion=fused, img2img=True).pipeline
            for fused in (False, True)}


# One sampler of each update kind in the default tier (first-order, ancestral, SDE with Karras sigmas,
# multistep, second-order, linear multistep); every other sampler in the slow tier.
DEFAULT_TIER_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_sde_karras", "unipc", "heun", "plms")


@pytest.mark.parametrize("sampler", [s if s in DEFAULT_TIER_SAMPLERS else pytest.param(s, marks=pytest.mark.slow)
                                     for s in sorted(SAMPLERS)])
def test_step_fused_equals_plain_for_inpainting(fused_and_plain, sampler):
    """Every sampler: the 9-channel UNet's extra inputs pass through the step graph, the 4-channel UNet's latent
    blend runs on the host between steps of either loop."""
    from sdrun.pipeline import GenerationRequest

    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, FUSED_SIZE, FUSED_SIZE)).astype(np.float32)
    mask = (mask_array(FUSED_SIZE) / 255.0).astype(np.float32)[None, None]
    latents = {}
    for fused, pipeline in fused_and_plain.items():
        result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE_PROMPT, seed=3, steps=FUSED_STEPS,
                                                     guidance=GUIDANCE, sampler=sampler, height=FUSED_SIZE,
                                                     width=FUSED_SIZE, image=image, mask=mask, strength=1.0))
        assert result.step_fused is fused
        latents[fused] = result.latents
    error = compare(latents[True], latents[False]).rel_l2
    print(f"\n{sampler}: rel L2 {error:.3g}")
    assert error <= FUSED_MAX_REL_L2


def inpaint_args(bundle, files, out, mask: str = "mask") -> list[str]:
    return ["inpaint", "--bundle", str(bundle), "--image", str(files["image"]), "--mask", str(files[mask]),
            "--prompt", PROMPT, "--steps", "2", "--out", str(out), "--quiet", "--backend", "onnxruntime"]


def test_mask_of_another_size_is_resized_with_a_note(tiny_bundle, files, tmp_path, capsys):
    code, stderr = sdrun(capsys, *inpaint_args(tiny_bundle, files, tmp_path / "out.png", mask="wide"))
    assert code == 0, stderr
    assert f"note: the mask is {2 * SIZE}x{2 * SIZE}; resized to the image's {SIZE}x{SIZE}" in stderr
    assert (tmp_path / "out.png").is_file()


def test_empty_mask_warns_and_keeps_the_input(tiny_bundle, files, tmp_path, capsys):
    code, stderr = sdrun(capsys, *inpaint_args(tiny_bundle, files, tmp_path / "out.png", mask="empty"))
    assert code == 0, stderr
    assert "warning: the mask is empty" in stderr and "nothing to paint" in stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(files["image"])))


def test_bundle_without_vae_encoder_is_refused(tiny_bundle, files, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, stderr = sdrun(capsys, *inpaint_args(bundle, files, tmp_path / "out.png"))
    assert code == 2
    assert "lacks the component(s) vae_encoder" in stderr and "sdcompile export --component vae_encoder" in stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("shape, message", [((1, 1, SIZE, SIZE // 2), "does not fit the image"),
                                            ((1, 3, SIZE, SIZE), "does not fit the image"),
                                            ((2, 1, SIZE, SIZE), "does not fit the image")])
def test_request_mask_is_validated(tiny_recipe, shape, message):
    from sdrun.errors import UserError
    from sdrun.pipeline import GenerationRequest, complete_request

    image = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(UserError, match=message):
        complete_request(GenerationRequest(PROMPT, image=image, mask=np.zeros(shape, np.float32)), tiny_recipe)


def test_request_mask_needs_an_image_and_values_in_range(tiny_recipe):
    from sdrun.errors import UserError
    from sdrun.pipeline import GenerationRequest, complete_request

    mask = np.zeros((1, 1, SIZE, SIZE), np.float32)
    with pytest.raises(UserError, match="needs the image"):
        complete_request(GenerationRequest(PROMPT, mask=mask), tiny_recipe)
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        complete_request(GenerationRequest(PROMPT, image=np.zeros((1, 3, SIZE, SIZE), np.float32), mask=mask + 2),
                         tiny_recipe)
