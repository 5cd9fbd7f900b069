"""Every model family's tiny twin takes the whole path a user's file takes.

For each family: a single file laid out as the released checkpoints are (see `fixtures/released_layout`),
`sdcompile export` through the CLI, txt2img on ONNX Runtime, and diffusers' `StableDiffusionPipeline`
(`StableDiffusionXLPipeline` for SDXL) built from the same file by diffusers' own converters as the judge (fp32 float images within 1e-3).
A family without a twin here fails `test_every_family_has_a_twin`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from sdcompile.recipes import Family, available_recipes, load_recipe
from sdrun.metrics import compare
from tests.family_twin import SEED, Twin, cli
from tests.fixtures.released_layout import key_pattern, released_state_dict, write_ckpt
from tests.models.reference_keys import PREFIXES, reference_shapes

TWINS = {Family.SD1: "tiny", Family.SD2: "tiny-v", Family.SDXL: "tiny-xl"}
# Released key lists we hold (tests/data); SDXL's layout is checked against diffusers' single-file converters
# instead (tests/weights/test_sdxl_loading.py).
REFERENCE_SECTIONS = {Family.SD1: ("sd1_unet", "vae", "sd1_text"), Family.SD2: ("sd2_unet", "vae", "sd2_text")}
PROMPT, NEGATIVE_PROMPT = "a lighthouse on a cliff at dawn", "blurry"
STEPS, GUIDANCE, SIZE = 10, 7.5, 64
PEER_MAX_ABS = 1e-3  # decoded float images in [-1, 1], fp32 against fp32 in another op order


@pytest.fixture(scope="module", params=sorted(TWINS.values()))
def twin(request, released_twin) -> Twin:
    return released_twin(request.param)


def test_every_family_has_a_twin():
    families = {load_recipe(name).family for name in available_recipes()}
    assert families == set(TWINS), f"families without a tiny twin here: {families - set(TWINS)}"
    assert all(load_recipe(name).family is family for family, name in TWINS.items())


@pytest.mark.parametrize("family", sorted(REFERENCE_SECTIONS, key=lambda f: f.value))
def test_twin_file_has_the_released_key_layout(family):
    """Block indices aside, every key (and its rank) is one a released file of the family has; the text
    tower's keys are all of them, 0-dim `logit_scale` included for SD 2.x."""
    recipe = load_recipe(TWINS[family])
    state = released_state_dict(recipe, SEED)
    for section in REFERENCE_SECTIONS[family]:
        prefix = PREFIXES[section]
        released = {key_pattern(prefix + k): len(shape) for k, shape in reference_shapes(section).items()}
        ours = {key_pattern(k): v.ndim for k, v in state.items() if k.startswith(prefix)}
        assert ours.items() <= released.items(), f"{section}: {sorted(ours.items() - released.items())[:5]}"
        if section.endswith("_text"):
            assert ours == released, f"{section}: missing {sorted(released.keys() - ours.keys())[:5]}"
    assert state["model_ema.decay"].ndim == 0 and "betas" in state


def test_exported_twin_matches_diffusers_on_the_same_file(twin):
    from benchmarks.peer import diffusers_pipeline, run_peer
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    pipeline = load_pipeline(twin.bundle, "onnxruntime").pipeline
    result = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE,
                                                 height=SIZE, width=SIZE, init_noise=noise))
    ours = np.clip(result.decoded, -1.0, 1.0)
    peer = diffusers_pipeline(load_file(str(twin.file)), load_recipe(twin.recipe_name))
    theirs = run_peer(peer, PROMPT, NEGATIVE_PROMPT, STEPS, GUIDANCE, noise, SIZE, SIZE)
    image = compare(ours, theirs, data_range=2.0)
    print(f"\n{twin.recipe_name}: onnxruntime vs diffusers, image max abs {image.max_abs:.3g}, "
          f"PSNR {image.psnr_db:.1f} dB")
    assert image.max_abs <= PEER_MAX_ABS, f"image max abs {image.max_abs:.3g} > {PEER_MAX_ABS}"


def test_ckpt_of_the_same_weights_exports_identically(twin, tmp_path):
    """The pickled `.ckpt` form (read by our restricted unpickler) gives the same weights hash."""
    from sdcompile.cli import main

    ckpt = write_ckpt(load_file(str(twin.file)), tmp_path / "model.ckpt")
    cli(main, "export", "--recipe", twin.recipe_name, "--checkpoint", str(ckpt), "--component", "text_encoder",
        "--out", str(tmp_path / "bundle"))
    manifests = [json.loads((b / "manifest.json").read_text()) for b in (twin.bundle, tmp_path / "bundle")]
    assert manifests[0]["weights_sha256"] == manifests[1]["weights_sha256"]


def test_sdrun_txt2img_writes_a_png(twin, tmp_path):
    from PIL import Image

    from sdrun.cli import main

    out = tmp_path / "out.png"
    cli(main, "txt2img", "--bundle", str(twin.bundle), "--prompt", PROMPT, "--steps", "2",
        "--backend", "onnxruntime", "--quiet", "--out", str(out))
    assert Image.open(out).size == (SIZE, SIZE)
