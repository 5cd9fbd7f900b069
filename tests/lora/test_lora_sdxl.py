"""SDXL LoRAs merged at export, on tiny-xl, against diffusers on the same weights.

The weights are a released-layout SDXL file (`tests/fixtures/released_layout.py`); diffusers' UNet, VAE and
transformers' CLIPTextModel / CLIPTextModelWithProjection hold them through diffusers' single-file
converters, in the peer's `StableDiffusionXLPipeline` (`benchmarks/peer.py`). One random rank-4 LoRA on the UNet (its two-block level
included) and both text encoders, saved by diffusers (`unet.`, `text_encoder.`, `text_encoder_2.`), and its
kohya copy (`lora_unet_`, `lora_te1_`, `lora_te2_`). Merged into our models, the kohya copy gives the
weights diffusers' `load_lora_weights` + `fuse_lora` (UNet) and PEFT's merge (text encoders) give, bit for
bit, and so the same outputs (fp32 relative L2: text encoders 1e-5, UNet 5e-5). Swapped into a plain
tiny-xl bundle at run time, the diffusers file writes the initializers the merge wrote, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompile.weights import Component
from tests.lora.lora_files import (SDXL_KOHYA_PREFIXES, TEXT_TARGETS, UNET_TARGETS, kohya_copy, pipeline_with_loras,
                                   random_adapters)

SCALE = 0.8
TEXT_REL_L2 = 1e-5  # ours merged vs PEFT merged, fp32, relative L2 of hidden states and pooled output
# Ours merged vs diffusers fused, fp32, relative L2 of the output. Without the LoRA the two UNets differ by
# 1.4e-6 on this input; the LoRA's random deltas (a 1.6 relative change of the output) raise that to 1.1e-5,
# the merged weights being equal bit for bit.
UNET_REL_L2 = 5e-5
MIN_EFFECT = 0.05  # relative L2 change the LoRA makes to each output, so equality is not vacuous
SEED = 11
TEXT_MODELS = {"text_encoder": Component.TEXT_ENCODER, "text_encoder_2": Component.TEXT_ENCODER_2}
UNET_XL_TARGETS = [*UNET_TARGETS, "ff.net.2", "proj_out", "conv_shortcut", "linear_1"]


@pytest.fixture(scope="module")
def recipe():
    from sdcompile.recipes import load_recipe

    return load_recipe("tiny-xl")


@pytest.fixture(scope="module")
def released(recipe, tmp_path_factory):
    """(released-layout state dict, its .safetensors file)."""
    from tests.fixtures.released_layout import released_state_dict, write_safetensors

    state = released_state_dict(recipe, SEED)
    return state, write_safetensors(state, tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors")


def diffusers_xl_pipeline(recipe, released_state):
    """A `StableDiffusionXLPipeline` on the weights of the released file, converted by diffusers."""
    from benchmarks.peer import diffusers_pipeline

    return diffusers_pipeline(released_state, recipe)


@pytest.fixture(scope="module")
def loras(recipe, released, tmp_path_factory):
    """{"diffusers": file saved by diffusers, "kohya": its kohya copy}."""
    from diffusers import StableDiffusionXLPipeline

    directory = tmp_path_factory.mktemp("sdxl-loras")
    pipe = diffusers_xl_pipeline(recipe, released[0])
    models = {"unet": (pipe.unet, UNET_XL_TARGETS), "text_encoder": (pipe.text_encoder, TEXT_TARGETS),
              "text_encoder_2": (pipe.text_encoder_2, TEXT_TARGETS + ["fc2"])}
    StableDiffusionXLPipeline.save_lora_weights(str(directory), weight_name="xl.safetensors",
                                                **random_adapters(models, seed=3))
    path = directory / "xl.safetensors"
    return {"diffusers": path, "kohya": kohya_copy(path, directory / "xl_kohya.safetensors", SDXL_KOHYA_PREFIXES)}


def merged_models(recipe, released_file, lora):
    from sdcompile.weights import load_models
    from sdcompile.weights.lora_merge import LoraMerge
    from sdrun.lora import LoraRequest

    models = load_models(recipe, released_file)
    merge = LoraMerge([LoraRequest(lora, SCALE)], recipe)
    for part in (Component.UNET, *TEXT_MODELS.values()):
        merge.apply_(models, part)
    return models, merge


def input_ids(config) -> torch.Tensor:
    """(1, context_length) seeded token ids ending in <end_of_text> (the largest id), as a prompt is padded."""
    ids = np.random.default_rng(3).integers(0, config.vocab_size - 1, (1, config.context_length))
    ids[0, 20] = config.vocab_size - 1
    return torch.from_numpy(ids)


def our_text_outputs(models, recipe) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        hidden_2, pooled = models.text_encoder_2(input_ids(recipe.text_encoder_2))
        return {"text_encoder": models.text_encoder(input_ids(recipe.text_encoder)), "text_encoder_2": hidden_2,
                "pooled": pooled}


def their_text_outputs(pipe, recipe) -> dict[str, torch.Tensor]:
    """SDXL reads both encoders before their final LayerNorm: transformers' hidden_states[-2]."""
    with torch.no_grad():
        first = pipe.text_encoder(input_ids(recipe.text_encoder), output_hidden_states=True)
        second = pipe.text_encoder_2(input_ids(recipe.text_encoder_2), output_hidden_states=True)
    return {"text_encoder": first.hidden_states[-2], "text_encoder_2": second.hidden_states[-2],
            "pooled": second.text_embeds}


def unet_outputs(ours, theirs, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Our UNet's and diffusers' output (1, 4, 8, 8) for the same seeded latents, timestep, context (1, 77, C)
    and added conditioning: pooled text and size values, which our y (1, adm_in_channels) is made of."""
    from sdrun.sdxl_conditioning import SizeConditioning, conditioning_vector

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    timesteps = torch.tensor([501.0])
    context = torch.randn(1, 77, config.context_dim, generator=generator)
    pooled = torch.randn(1, config.adm_in_channels - 6 * config.size_embed_dim, generator=generator)
    sizes = torch.tensor([SizeConditioning(1024, 768, 32, 16, 1024, 1024)], dtype=torch.float32)
    y = torch.from_numpy(conditioning_vector(pooled.numpy(), sizes.numpy(), config.size_embed_dim))
    with torch.no_grad():
        return ours(x, timesteps, context, y), theirs(x, timesteps, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": sizes}).sample


def peer_weights_in_our_layout(pipe, recipe) -> dict[Component, dict[str, torch.Tensor]]:
    """The merged peers' weights (PEFT's `base_layer` holding the merged weight) renamed to our keys."""
    from sdcompile import diffusers_layout

    def merged(model) -> dict[str, torch.Tensor]:
        return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}

    return {Component.UNET: diffusers_layout.unet_from_diffusers(merged(pipe.unet), recipe.unet),
            Component.TEXT_ENCODER: diffusers_layout.text_from_hf(merged(pipe.text_encoder), recipe.text_encoder),
            Component.TEXT_ENCODER_2: diffusers_layout.text_from_hf(merged(pipe.text_encoder_2),
                                                                     recipe.text_encoder_2)}


def safetensors_keys(path) -> list[str]:
    import safetensors

    with safetensors.safe_open(str(path), "np") as file:
        return list(file.keys())


def rel_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs))


def test_kohya_sdxl_lora_merges_as_diffusers_fuses_it(recipe, released, loras):
    from sdcompile.weights import load_models

    state, file = released
    ours, merge = merged_models(recipe, file, loras["kohya"])
    plain = load_models(recipe, file)
    pipe = diffusers_xl_pipeline(recipe, state)
    before_text = their_text_outputs(pipe, recipe)
    before_unet = unet_outputs(plain.unet, pipe.unet, recipe.unet)[1]
    text_targets = {"text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS + ["fc2"]}
    pipe = pipeline_with_loras(pipe, [(loras["diffusers"], SCALE)], text_targets)
    theirs, mine = their_text_outputs(pipe, recipe), our_text_outputs(ours, recipe)
    errors = {name: (rel_l2(mine[name], theirs[name]), rel_l2(before_text[name], theirs[name])) for name in mine}
    unet_ours, unet_theirs = unet_outputs(ours.unet, pipe.unet, recipe.unet)
    errors["unet"] = rel_l2(unet_ours, unet_theirs), rel_l2(before_unet, unet_theirs)
    for name, (error, effect) in errors.items():
        print(f"\ntiny-xl {name}: merged kohya LoRA vs diffusers: rel L2 {error:.2e} (LoRA effect {effect:.2f})")
    gates = {name: UNET_REL_L2 if name == "unet" else TEXT_REL_L2 for name in errors}
    assert all(error < gates[name] and effect > MIN_EFFECT for name, (error, effect) in errors.items()), errors
    for part, theirs in peer_weights_in_our_layout(pipe, recipe).items():
        mine = ours.component(part).state_dict()
        compared = [key for key in mine if key in theirs]
        assert len(compared) >= len(mine) - 2, part  # position_ids, logit_scale: not transformers' / not stored
        for key in compared:
            assert torch.equal(mine[key], theirs[key]), f"{part.value} {key}"
    modules = {model: sum(key.startswith(f"{model}.") and key.endswith(".lora_A.weight") for key in file_keys)
               for file_keys in [safetensors_keys(loras["diffusers"])] for model in ("unet", *TEXT_MODELS)}
    stacked = modules["text_encoder_2"] - 2 * recipe.text_encoder_2.layers  # each layer's q, k, v: one in_proj_weight
    assert merge.records()[0]["tensors"] == modules | {"text_encoder_2": stacked}


def test_the_diffusers_file_and_its_kohya_copy_merge_alike(recipe, released, loras):
    kohya, _ = merged_models(recipe, released[1], loras["kohya"])
    peft, _ = merged_models(recipe, released[1], loras["diffusers"])
    for part in (Component.UNET, *TEXT_MODELS.values()):
        theirs = peft.component(part).state_dict()
        for key, value in kohya.component(part).state_dict().items():
            assert torch.equal(value, theirs[key]), f"{part.value} {key}"


@pytest.mark.slow  # two tiny-xl exports (~2 min on 2 cores); the export merge is checked above
def test_run_time_swap_into_an_sdxl_bundle_writes_the_merged_weights(loras, tmp_path):
    from tests.lora.test_lora_parity import assert_swap_writes_the_merged_weights, export

    components = ["text_encoder", "text_encoder_2", "unet"]
    plain = export("tiny-xl", tmp_path / "plain", components=components)
    merged = export("tiny-xl", tmp_path / "lora", "--lora", f"{loras['kohya']}:{SCALE}", components=components)
    assert_swap_writes_the_merged_weights(plain, merged, loras["diffusers"], SCALE, components)
