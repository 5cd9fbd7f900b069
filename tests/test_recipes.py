import dataclasses

import pytest

from sdcompile.recipes import (RECIPES_DIR, Family, Parameterization, TextOutputLayer, TokenizerPadding,
                               available_recipes,
                               load_recipe, recipe_from_dict)
from sdrun.errors import UserError


def test_builtin_recipes_load():
    assert available_recipes() == ["sd15", "sd15-inpainting", "sd2-inpainting", "sd21", "sd21-base", "sdxl", "tiny",
                                   "tiny-inpainting", "tiny-shapes", "tiny-v", "tiny-xl"]
    for name in available_recipes():
        assert load_recipe(name).name == name


def test_recipe_values_follow_the_original_configs():
    sd15, sd21, base = load_recipe("sd15"), load_recipe("sd21"), load_recipe("sd21-base")
    assert sd15.family is Family.SD1 and sd15.text_encoder.padding is TokenizerPadding.END_TOKEN
    assert base.family is Family.SD2 and base.parameterization is Parameterization.EPS
    assert sd21.parameterization is Parameterization.V and sd21.default_height == 768
    assert sd21.text_encoder.padding is TokenizerPadding.ZERO
    assert sd15.unet.num_heads == 8 and base.unet.num_head_channels == 64
    assert sd15.schedule.linear_start == 0.00085 and sd15.latent_scale_factor == 0.18215


@pytest.mark.parametrize("name, base", [("sd15-inpainting", "sd15"), ("sd2-inpainting", "sd21-base"),
                                        ("tiny-inpainting", "tiny")])
def test_inpainting_recipes_are_their_base_with_nine_unet_input_channels(name, base):
    """v1/v2-inpainting-inference.yaml: the base UNet with in_channels 9 (latent 4, mask 1, masked-image latents 4)."""
    inpainting, plain = load_recipe(name), load_recipe(base)
    assert inpainting.unet.in_channels == 9 and inpainting.unet.inpainting and not plain.unet.inpainting
    assert dataclasses.replace(inpainting.unet, in_channels=4) == plain.unet
    assert (inpainting.text_encoder, inpainting.vae, inpainting.family) == (plain.text_encoder, plain.vae, plain.family)


def test_unet_input_channels_must_be_the_latent_or_inpainting():
    data = load_recipe("tiny").to_dict()
    data["unet"]["in_channels"] = 7
    with pytest.raises(UserError, match="in_channels must equal out_channels"):
        recipe_from_dict(data)


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_round_trip_through_dict(name):
    recipe = load_recipe(name)
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_sdxl_recipe_follows_sd_xl_base():
    sdxl = load_recipe("sdxl")
    unet, (clip, bigg) = sdxl.unet, sdxl.text_encoders
    assert sdxl.family is Family.SDXL and sdxl.latent_scale_factor == 0.13025 and sdxl.default_guidance == 5.0
    assert [unet.depth_at(level) for level in range(3)] == [0, 2, 10] and unet.mid_depth == 10
    assert [unet.has_attention(level) for level in range(3)] == [False, True, True]
    assert unet.context_dim == clip.width + bigg.width == 2048
    assert unet.adm_in_channels == bigg.width + 6 * unet.size_embed_dim == 2816
    assert (bigg.width, bigg.heads, bigg.layers, bigg.pooled_output) == (1280, 20, 32, True)
    assert clip.output_layer is bigg.output_layer is TextOutputLayer.PENULTIMATE_HIDDEN


def test_scalar_transformer_depth_applies_to_every_level_and_the_middle():
    unet = load_recipe("sd15").unet
    assert unet.transformer_depth == 1 and unet.mid_depth == 1
    assert load_recipe("sd15").text_encoder_2 is None and unet.adm_in_channels == 0


def _write(tmp_path, text):
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return str(path)


def _tiny_text(**replace):
    text = (RECIPES_DIR / "tiny.toml").read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def test_unknown_key_names_file_and_key(tmp_path):
    path = _write(tmp_path, _tiny_text(**{"num_res_blocks = 1\nchannel_mult": "num_res_blocks = 1\nchanel_mult = [1]\nchannel_mult"}))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "custom.toml" in message and "unet.chanel_mult" in message and "channel_mult" in message


def test_wrong_type_names_expected_type(tmp_path):
    path = _write(tmp_path, _tiny_text(**{"model_channels = 32": 'model_channels = "32"'}))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "unet.model_channels" in str(err.value) and "int" in str(err.value)


def test_bad_enum_value_lists_choices(tmp_path):
    path = _write(tmp_path, _tiny_text(**{'parameterization = "eps"': 'parameterization = "x0"'}))
    with pytest.raises(UserError, match="'eps' \\| 'v'"):
        load_recipe(path)


def test_shape_ranges_are_checked(tmp_path):
    path = _write(tmp_path, _tiny_text(**{"height = { min = 32, opt = 64, max = 128 }": "height = { min = 64, opt = 32, max = 128 }"}))
    with pytest.raises(UserError, match="min <= opt <= max"):
        load_recipe(path)


def test_unknown_recipe_name_lists_available():
    with pytest.raises(UserError) as err:
        load_recipe("sd99")
    assert "sd15" in str(err.value) and "sd99" in str(err.value)


def test_size_multiple():
    assert load_recipe("sd15").size_multiple == 64
    assert load_recipe("tiny").size_multiple == 16
    assert dataclasses.is_dataclass(load_recipe("tiny"))


def _tiny_xl_text(**replace):
    text = (RECIPES_DIR / "tiny-xl.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("old, new, message", [
    ("transformer_depth = [0, 1, 2]", "transformer_depth = [0, 1]", "one depth per level"),
    ("adm_in_channels = 128", "adm_in_channels = 2816", "set it to 128"),
    ("context_dim = 64", "context_dim = 32", "sum of the text encoders' widths"),
    ("transformer_depth = [0, 1, 2]", 'transformer_depth = "deep"', "int or a list of int"),
])
def test_sdxl_structure_is_checked(tmp_path, old, new, message):
    with pytest.raises(UserError, match=message):
        load_recipe(_write(tmp_path, _tiny_xl_text(**{old: new})))
