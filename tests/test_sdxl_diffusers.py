"""SDXL base at full size (slow tier) and its tiny-xl twin (random weights): the released single-file layout
and parity with diffusers.

- Keys and shapes (fp16, exact): diffusers' SDXL pipeline with seeded random weights, saved as a diffusers
  folder, read by our loader and written by our writer as one single file, loads in diffusers'
  `StableDiffusionXLPipeline.from_single_file` (offline, configs from that folder) with every tensor equal to
  the saved one; our loader reads the file and the folder to the same tensors.
- tiny-xl only: a file in the released layout (`fixtures/released_layout`) gives the same tensors through
  `from_single_file` as through our loader.
- Parity (fp32): our UNet against the peer's `UNet2DConditionModel` holding the same tensors (32x32 latents),
  our text encoders against the peer's `CLIPTextModel` / `CLIPTextModelWithProjection` (rel L2 <= 1e-5).

At full size one model at a time where two copies would not fit: the fp32 UNet alone is 10.3 GB.
"""
from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from benchmarks import peer
from sdcompile.recipes import TokenizerPadding, load_recipe
from sdcompile.weights import (Component, RandomWeights, StableDiffusionModels, load_models, randomize_parameters_,
                               read_checkpoint, save_ldm_checkpoint)
from sdrun.metrics import compare
from tests.models.model_checks import sdxl_added_conditioning

RECIPES = ["tiny-xl", pytest.param("sdxl", marks=pytest.mark.slow)]
SEED = 21
MAX_REL_L2 = 1e-5  # ‖ours − theirs‖₂ / ‖theirs‖₂, fp32
LATENT_SIZE = 32  # the UNet runs at 256x256 pixels: every level, a fraction of the 1024x1024 cost
# diffusers pipeline folder name -> our component
FOLDER_PARTS = {"unet": Component.UNET, "vae": Component.VAE, "text_encoder": Component.TEXT_ENCODER,
                "text_encoder_2": Component.TEXT_ENCODER_2}
# Keys one side of a comparison may lack: CLIP's constant position ids (transformers >= 5 saves none) and
# OpenCLIP's temperature (diffusers has none; our loader fills it).
SPARE_KEYS = ("position_ids", "logit_scale")


# diffusers' `from_single_file` tells an SDXL file's bigG tower by its 10th block (`resblocks.9`), and takes it
# for CLIP ViT-L where both towers are as wide (`create_diffusers_clip_model_from_ldm`).
DETECTED_BIGG_LAYERS = 10
DETECTED_WIDTH_MARGIN = 16


def detectable_by_diffusers(recipe):
    """The recipe, or (tiny-xl) a variant whose second tower diffusers' single-file loader recognises:
    10 blocks, wider than the first; the UNet's context and pooled widths follow."""
    first, second = recipe.text_encoders
    if second.layers >= DETECTED_BIGG_LAYERS and second.width != first.width:
        return recipe
    width = first.width + DETECTED_WIDTH_MARGIN
    second = dataclasses.replace(second, width=width, heads=width // 16, layers=DETECTED_BIGG_LAYERS)
    pooled_change = second.width - recipe.text_encoder_2.width
    unet = dataclasses.replace(recipe.unet, context_dim=first.width + second.width,
                               adm_in_channels=recipe.unet.adm_in_channels + pooled_change)
    return dataclasses.replace(recipe, name=f"{recipe.name}-detectable", text_encoder_2=second, unet=unet)


# --- diffusers' pipeline with random weights --------------------------------------------------------------


def random_diffusers_model(model_class, config: dict, namespace: str, dtype: torch.dtype):
    """A diffusers model built on the meta device and allocated once in `dtype`, every parameter seeded."""
    with torch.device("meta"):
        model = model_class(**config)
    return randomize_parameters_(model.to(dtype).to_empty(device="cpu"), SEED, namespace).eval()


def random_hf_text_encoder(recipe, index: int, dtype: torch.dtype):
    import transformers

    cfg = recipe.text_encoders[index]
    model_class = transformers.CLIPTextModelWithProjection if cfg.pooled_output else transformers.CLIPTextModel
    model = randomize_parameters_(model_class(peer.text_config(cfg, transformers)), SEED, f"text{index}.")
    return model.to(dtype).eval()


def write_random_diffusers_folder(recipe, folder: Path, dtype: torch.dtype) -> None:
    """`StableDiffusionXLPipeline.save_pretrained` of seeded random models (configs of the peer)."""
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=random_diffusers_model(diffusers.UNet2DConditionModel, peer.unet_config(recipe), "unet.", dtype),
        vae=random_diffusers_model(diffusers.AutoencoderKL, peer.vae_config(recipe), "vae.", dtype),
        text_encoder=random_hf_text_encoder(recipe, 0, dtype), text_encoder_2=random_hf_text_encoder(recipe, 1, dtype),
        tokenizer=peer.clip_tokenizer(recipe, 0), tokenizer_2=peer.clip_tokenizer(recipe, 1),
        scheduler=diffusers.DDIMScheduler(**peer.scheduler_config(recipe)), add_watermarker=False)
    pipe.save_pretrained(folder)


def saved_tensors(subfolder: Path) -> dict[str, torch.Tensor]:
    """What `save_pretrained` wrote in one component folder (memory-mapped)."""
    state = {}
    for path in sorted(subfolder.glob("*.safetensors")):
        state |= load_file(str(path))
    return state


def assert_same_tensors(name: str, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The same keys (`SPARE_KEYS` aside), dtypes and bits."""
    unmatched = sorted(k for k in state.keys() ^ reference.keys() if not k.endswith(SPARE_KEYS))
    assert not unmatched, f"{name}: keys on one side only, e.g. {unmatched[:5]}"
    differing = [key for key, value in reference.items() if key in state
                 and (value.dtype != state[key].dtype or not torch.equal(value, state[key]))]
    assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"


# --- our loader and writer ---------------------------------------------------------------------------------


def single_file_from_folder(recipe, folder: Path, path: Path, dtype: torch.dtype) -> Path:
    """Our loader on the folder, one model at a time (the fp32 build of each is transient), then our writer."""
    parts = {part: load_models(recipe, folder, dtype, parts=(part,)) for part in FOLDER_PARTS.values()}
    models = StableDiffusionModels(
        unet=parts[Component.UNET].unet, vae=parts[Component.VAE].vae,
        text_encoder=parts[Component.TEXT_ENCODER].text_encoder, report=parts[Component.UNET].report,
        text_encoder_2=parts[Component.TEXT_ENCODER_2].text_encoder_2, prefixes=parts[Component.UNET].prefixes)
    return save_ldm_checkpoint(models, path)


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_our_sdxl_single_file_loads_in_diffusers_from_single_file_bit_identically(recipe_name, tmp_path):
    sdxl = detectable_by_diffusers(load_recipe(recipe_name))
    dtype = torch.float16  # exact through our loader (fp16 -> fp32 -> fp16) and half the memory
    folder = tmp_path / "diffusers"
    write_random_diffusers_folder(sdxl, folder, dtype)
    gc.collect()
    file = single_file_from_folder(sdxl, folder, tmp_path / "sdxl.safetensors", dtype)
    gc.collect()

    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), torch_dtype=dtype,
                                                                local_files_only=True)
    for name in FOLDER_PARTS:
        assert_same_tensors(name, getattr(pipe, name).state_dict(), saved_tensors(folder / name))
    del pipe
    gc.collect()

    from_folder = read_checkpoint(folder, sdxl)[0].components
    for name, part in FOLDER_PARTS.items():
        ours = load_models(sdxl, file, dtype, parts=(part,)).component(part).state_dict()
        assert_same_tensors(f"{name}, file against folder", ours, from_folder[part])
        del ours
        gc.collect()


def write_config_folder(pipe, folder: Path) -> Path:
    """A pipeline folder without weights: model_index.json, each model's config, tokenizers and scheduler."""
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if isinstance(component, diffusers.ModelMixin):
            component.save_config(folder / name)
        elif isinstance(component, torch.nn.Module):  # transformers' text models
            component.config.save_pretrained(folder / name)
        elif component is not None:  # tokenizers, the scheduler
            component.save_pretrained(folder / name)
    return folder


def test_released_layout_file_loads_in_diffusers_as_in_our_loader(tmp_path):
    """tiny-xl in sd_xl_base_1.0's layout (text towers written by transformers and open_clip): diffusers'
    `from_single_file`, offline with configs alone from a folder, gives our loader's tensors bit for bit,
    compared in our names (renamed by `diffusers_layout`, a mapping independent of diffusers')."""
    from sdcompile import diffusers_layout
    from tests.fixtures.released_layout import released_state_dict, write_safetensors

    recipe = detectable_by_diffusers(load_recipe("tiny-xl"))
    file = write_safetensors(released_state_dict(recipe, SEED), tmp_path / f"{recipe.name}.safetensors")
    configs = write_config_folder(peer.diffusers_pipeline(load_file(str(file)), recipe), tmp_path / "configs")
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(file), config=str(configs),
                                                                  local_files_only=True)
    ours = load_models(recipe, file)
    renamed = {
        Component.UNET: diffusers_layout.unet_from_diffusers(theirs.unet.state_dict(), recipe.unet),
        Component.VAE: diffusers_layout.vae_from_diffusers(theirs.vae.state_dict(), recipe.vae),
        Component.TEXT_ENCODER: diffusers_layout.text_from_hf(theirs.text_encoder.state_dict(), recipe.text_encoder),
        Component.TEXT_ENCODER_2: diffusers_layout.text_from_hf(theirs.text_encoder_2.state_dict(),
                                                                recipe.text_encoder_2),
    }
    for part, state in renamed.items():
        assert_same_tensors(part.value, ours.component(part).state_dict(), state)


# --- fp32 parity with the peer's models ---------------------------------------------------------------------


def random_part(recipe, part: Component) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """One of our models with seeded random weights, and its tensors (not copied) under the single-file keys."""
    models = load_models(recipe, RandomWeights(SEED), parts=(part,))
    model = models.component(part)
    return model, {models.prefixes[part] + key: value for key, value in model.state_dict().items()}


def assert_parity(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    error = compare(ours.numpy(), theirs.numpy()).rel_l2
    print(f"\n{name}: rel L2 {error:.3g}")
    assert error <= MAX_REL_L2, f"{name}: rel L2 {error:.3g} > {MAX_REL_L2} (would need {error:.3g})"


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_sdxl_unet_matches_diffusers(recipe_name):
    """The peer's UNet holds our UNet's tensors (`share`), so one copy (10.3 GB at full size) serves both."""
    sdxl = load_recipe(recipe_name)
    unet, ldm = random_part(sdxl, Component.UNET)
    theirs = peer.diffusers_unet(ldm, sdxl, share=True)
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    context = torch.randn(2, 77, sdxl.unet.context_dim, generator=generator)
    added, y = sdxl_added_conditioning(sdxl.unet, generator=generator)
    timesteps = torch.tensor([1.0, 981.0])
    with torch.no_grad():
        expected = theirs(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        assert_parity(f"{recipe_name} unet", unet(latents, timesteps, context, y), expected)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_sdxl_text_encoders_match_transformers(recipe_name, index):
    """Hidden states before the final LayerNorm of the penultimate layer; bigG also its pooled projection."""
    from sdrun.tokenizer import ClipTokenizer

    sdxl = load_recipe(recipe_name)
    part = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)[index]
    encoder, ldm = random_part(sdxl, part)
    theirs = peer.hf_text_encoder(ldm, sdxl, index)
    tokenizer = ClipTokenizer.from_file(peer.open_clip_vocab_file())
    pad_id = 0 if sdxl.text_encoders[index].padding is TokenizerPadding.ZERO else tokenizer.end_id
    ids = torch.from_numpy(tokenizer(["a lighthouse on a cliff at dawn", ""], pad_id, 77).ids).long()
    with torch.no_grad():
        output = theirs(ids, output_hidden_states=True)
        ours = encoder(ids)
    hidden = ours[0] if index else ours
    assert_parity(f"{recipe_name} text_encoder {index}", hidden, output.hidden_states[-2])
    if index:
        assert_parity(f"{recipe_name} text_encoder 1 pooled", ours[1], output.text_embeds)
