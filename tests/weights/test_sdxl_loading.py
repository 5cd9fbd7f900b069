"""SDXL checkpoints: the tiny-xl twin as a released single file and as a diffusers folder, its seeded
random weights, key checks, and the full-size key layout against diffusers' single-file converters."""
from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file
from weight_checks import COUNTS, assert_same_weights

from sdcompile.diffusers_layout import OPENCLIP_LOGIT_SCALE
from sdcompile.recipes import load_recipe
from sdcompile.weights import (SDXL_LDM_PREFIXES, Component, RandomWeights, build_models, ldm_state_dict,
                               load_models, random_tensor)
from sdrun.errors import UserError
from tests.fixtures.released_layout import released_state_dict, write_safetensors

SEED = 5
BIGG_PREFIX = SDXL_LDM_PREFIXES[Component.TEXT_ENCODER_2] + "model."
LOGIT_SCALE = BIGG_PREFIX + "logit_scale"


@pytest.fixture(scope="module")
def tiny_xl():
    return load_recipe("tiny-xl")


@pytest.fixture(scope="module")
def released(tiny_xl) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny-xl file in sd_xl_base_1.0's layout, text towers from transformers and open_clip."""
    return released_state_dict(tiny_xl, SEED)


@pytest.fixture(scope="module")
def released_file(released, tmp_path_factory):
    return write_safetensors(released, tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors")


def test_released_sdxl_file_loads_bit_identically(tiny_xl, released, released_file):
    loaded = load_models(tiny_xl, released_file)
    assert released[LOGIT_SCALE].ndim == 0 and BIGG_PREFIX + "text_projection" in released
    assert_same_weights(released, ldm_state_dict(loaded))
    assert not loaded.report.filled and not loaded.report.skipped
    assert loaded.text_encoder_2 is not None


def test_diffusers_folder_of_the_same_weights_loads_identically(tiny_xl, released, released_file, tmp_path):
    write_diffusers_folder(released, tiny_xl, tmp_path)
    loaded = load_models(tiny_xl, tmp_path)
    from_folder, from_file = ldm_state_dict(loaded), ldm_state_dict(load_models(tiny_xl, released_file))
    # a diffusers folder stores no `logit_scale` (SDXL never reads it); it is filled with CLIP's initial one
    assert from_folder.pop(LOGIT_SCALE).item() == pytest.approx(OPENCLIP_LOGIT_SCALE)
    filled = {key for group in loaded.report.filled for key in group.examples}  # transformers 5 saves no position_ids
    assert "model.logit_scale" in filled <= {"model.logit_scale", "transformer.text_model.embeddings.position_ids"}
    from_file.pop(LOGIT_SCALE)
    assert_same_weights(from_file, from_folder)


def test_random_weights_are_seeded_by_the_sdxl_key(tiny_xl):
    models = load_models(tiny_xl, RandomWeights(3))
    alone = load_models(tiny_xl, RandomWeights(3), parts=(Component.TEXT_ENCODER_2,))
    assert alone.unet is None and alone.text_encoder is None
    key = "model.token_embedding.weight"
    ours = models.text_encoder_2.state_dict()[key]
    assert torch.equal(ours, alone.text_encoder_2.state_dict()[key])
    assert torch.equal(ours, random_tensor(SDXL_LDM_PREFIXES[Component.TEXT_ENCODER_2] + key, ours.shape, 3, True))
    other = load_models(tiny_xl, RandomWeights(4), parts=(Component.TEXT_ENCODER_2,))
    assert not torch.equal(ours, other.text_encoder_2.state_dict()[key])


def test_sdxl_file_with_a_missing_and_an_extra_tensor_is_refused(tiny_xl, released, tmp_path):
    state = dict(released)
    del state[BIGG_PREFIX + "ln_final.bias"]
    state["conditioner.embedders.2.weight"] = torch.ones(2)
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError) as info:
        load_models(tiny_xl, path)
    assert tuple(map(int, COUNTS.search(info.value.problem).groups())) == (1, 1, 0)
    assert "text_encoder_2: 1 missing, e.g. model.ln_final.bias" in info.value.got
    assert "conditioner.embedders.2.weight" in info.value.got


def test_sd1_file_into_sdxl_recipe_points_at_sd_recipes(tiny_xl, tmp_path, tiny_state):
    path = tmp_path / "sd1.safetensors"
    save_file(tiny_state, str(path))
    with pytest.raises(UserError) as info:
        load_models(tiny_xl, path)
    assert "text_encoder_2:" in info.value.got and "belong to SD 1.x / 2.x" in info.value.fix


def test_sdxl_file_into_sd1_recipe_points_at_sdxl_recipes(tiny_recipe, released_file):
    with pytest.raises(UserError) as info:
        load_models(tiny_recipe, released_file)
    assert "belong to SDXL" in info.value.fix and "tiny-xl" in info.value.fix


def test_sdxl_key_set_is_what_diffusers_single_file_conversion_reads():
    """Full size on the meta device: our SDXL keys are detected as `xl_base` by diffusers, and its four
    converters (what `from_single_file` runs) read every one of them, except CLIP's unused temperature."""
    from diffusers.loaders import single_file_utils as sf

    from benchmarks.peer import vae_config
    from tests.test_diffusers_parity import SDXL_BASE_DIFFUSERS_CONFIG

    recipe = load_recipe("sdxl")
    with torch.device("meta"):
        models = build_models(recipe)
        checkpoint = ReadRecorder({SDXL_LDM_PREFIXES[c] + k: v for c, m in models.items()
                                   for k, v in m.state_dict().items()})
        assert sf.infer_diffusers_model_type(checkpoint) == "xl_base"
        checkpoint.read.clear()
        sf.convert_ldm_unet_checkpoint(checkpoint, dict(SDXL_BASE_DIFFUSERS_CONFIG))
        sf.convert_ldm_vae_checkpoint(checkpoint, vae_config(recipe))
        sf.convert_ldm_clip_checkpoint(checkpoint)
        sf.convert_open_clip_checkpoint(types.SimpleNamespace(config=None), checkpoint, prefix=BIGG_PREFIX)
    assert not checkpoint.absent, sorted(checkpoint.absent)[:5]
    assert set(checkpoint) - checkpoint.read == {LOGIT_SCALE}


class ReadRecorder(dict):
    """A state dict that records which keys are read, and which reads found nothing."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read, self.absent = set(), set()

    def _note(self, key):
        (self.read if key in self else self.absent).add(key)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self._note(key)
        return super().pop(key, *default)


# --- a diffusers folder written by diffusers and transformers from the released file ------------------------


def write_diffusers_folder(released: dict[str, torch.Tensor], recipe, folder) -> None:
    """unet/, vae/, text_encoder/, text_encoder_2/ as `save_pretrained` writes them, the weights renamed by
    diffusers' own single-file converters (strict loads, so every key is accounted for)."""
    import transformers
    from diffusers.loaders import single_file_utils as sf

    from benchmarks.peer import vae_config
    from tests.test_diffusers_parity import diffusers_unet, diffusers_vae

    unet, vae = diffusers_unet(recipe), diffusers_vae(recipe)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(released, dict(unet.config)), strict=True)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(released, vae_config(recipe)), strict=True)
    clip = transformers.CLIPTextModel(hf_text_config(recipe.text_encoder))
    load_hf_text(clip, sf.convert_ldm_clip_checkpoint(released))
    bigg = transformers.CLIPTextModelWithProjection(hf_text_config(recipe.text_encoder_2))
    load_hf_text(bigg, sf.convert_open_clip_checkpoint(bigg, released, prefix=BIGG_PREFIX))
    for name, model in {"unet": unet, "vae": vae, "text_encoder": clip, "text_encoder_2": bigg}.items():
        model.save_pretrained(folder / name)


def hf_text_config(cfg):
    import transformers

    from benchmarks.peer import text_config

    return text_config(cfg, transformers)


def load_hf_text(model, converted: dict[str, torch.Tensor]) -> None:
    """Strict load into whichever key layout the installed transformers uses (`text_model.…` or flattened);
    only the constant `position_ids` buffer may be on one side alone."""
    wrapper = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {(k if k.startswith("text_projection") else wrapper + k.removeprefix("text_model.")): v
             for k, v in converted.items()}
    expected, position_ids = set(model.state_dict()), {wrapper + "embeddings.position_ids"}
    assert set(state) - expected <= position_ids and expected - set(state) <= position_ids
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=expected <= set(state))
