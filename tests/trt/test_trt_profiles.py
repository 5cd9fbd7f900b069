"""Engine profiles from recipe ranges: CFG doubling, latent units, overrides, static, refusals."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from sdcompile.trt import check_parser_supports, graph_info_from_onnx
from sdcompile.trt_profiles import (ShapeMode, ShapeRequest, check_profile_against_graph, is_static,
                                    parse_shape_override, profile_from_request)
from sdrun.bundle import TensorSpec
from sdrun.errors import UserError

# The tiny recipe: batch 1/1/4, height and width 32/64/128 pixels, 8 pixels per latent cell.
UNET_INPUTS = (TensorSpec("sample", "float32", ("cfg_batch", 4, "latent_height", "latent_width")),
               TensorSpec("timestep", "float32", (1,)),
               TensorSpec("encoder_hidden_states", "float32", ("cfg_batch", "context_tokens", 32)))
DECODER_INPUTS = (TensorSpec("latent", "float32", ("batch", 4, "latent_height", "latent_width")),)
ENCODER_INPUTS = (TensorSpec("images", "float32", ("batch", 3, "image_height", "image_width")),)
TEXT_INPUTS = (TensorSpec("input_ids", "int32", ("cfg_batch", 77)),)


def overrides(**levels: str) -> ShapeRequest:
    return ShapeRequest(overrides={level: parse_shape_override(level, text) for level, text in levels.items()})


def test_unet_profile_doubles_batch_for_guidance_in_latent_cells(tiny_recipe):
    profile = profile_from_request(tiny_recipe, UNET_INPUTS, ShapeRequest())
    assert profile["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert profile["encoder_hidden_states"] == {"min": [1, 77, 32], "opt": [2, 77, 32], "max": [8, 231, 32]}
    assert profile["timestep"] == {"min": [1], "opt": [1], "max": [1]}


def test_context_spans_one_to_the_recipes_most_prompt_chunks(tiny_recipe):
    """Short prompts (one 77-token chunk) are what engines are tuned for; long ones fit up to max_prompt_chunks."""
    import dataclasses

    from sdcompile.components import component_spec

    five = dataclasses.replace(tiny_recipe, max_prompt_chunks=5)
    for name in ("unet", "unet_step"):
        for recipe, most in ((tiny_recipe, 3 * 77), (five, 5 * 77)):
            context = profile_from_request(recipe, component_spec(name, recipe).inputs,
                                           ShapeRequest())["encoder_hidden_states"]
            assert [context[level][1] for level in ("min", "opt", "max")] == [77, 77, most], name
    static = profile_from_request(tiny_recipe, UNET_INPUTS, ShapeRequest(ShapeMode.STATIC))
    assert {tuple(shape) for shape in static["encoder_hidden_states"].values()} == {(2, 77, 32)}
    fixed = (TensorSpec("encoder_hidden_states", "float32", ("cfg_batch", 77, 32)),)  # a bundle from before
    assert profile_from_request(tiny_recipe, fixed, ShapeRequest())["encoder_hidden_states"]["max"] == [8, 77, 32]


def test_sdxl_profiles_cover_the_pooled_text_and_size_inputs():
    """The full-size SDXL UNet's added inputs follow the CFG batch; the step-fused one's the guided batch."""
    from sdcompile.components import component_spec
    from sdcompile.recipes import load_recipe

    recipe = load_recipe("sdxl")
    unet = profile_from_request(recipe, component_spec("unet", recipe).inputs, ShapeRequest())
    assert unet["text_embeds"] == {"min": [1, 1280], "opt": [2, 1280], "max": [8, 1280]}
    assert unet["time_ids"] == {"min": [1, 6], "opt": [2, 6], "max": [8, 6]}
    assert unet["encoder_hidden_states"]["max"] == [8, 3 * 77, 2048]
    assert unet["sample"]["opt"] == [2, 4, 128, 128]
    step = profile_from_request(recipe, component_spec("unet_step", recipe).inputs, ShapeRequest())
    assert step["text_embeds"] == {"min": [2, 1280], "opt": [2, 1280], "max": [8, 1280]}
    pooled = profile_from_request(recipe, component_spec("text_encoder_2", recipe).inputs, ShapeRequest())
    assert pooled["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [8, 77]}


def test_text_encoder_takes_both_prompt_halves(tiny_recipe):
    profile = profile_from_request(tiny_recipe, TEXT_INPUTS, ShapeRequest())
    assert profile["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [8, 77]}


def test_step_fused_unet_always_takes_twice_its_batch_of_embeddings(tiny_recipe):
    from sdcompile.components import component_spec

    profile = profile_from_request(tiny_recipe, component_spec("unet_step", tiny_recipe).inputs, ShapeRequest())
    assert profile["state"] == {"min": [5, 1, 4, 4, 4], "opt": [5, 1, 4, 8, 8], "max": [5, 4, 4, 16, 16]}
    assert profile["update"] == {"min": [5, 7], "opt": [5, 7], "max": [5, 7]}
    assert profile["encoder_hidden_states"] == {"min": [2, 77, 32], "opt": [2, 77, 32], "max": [8, 231, 32]}


def test_vae_batch_is_not_doubled_and_sizes_are_in_their_units(tiny_recipe):
    decoder = profile_from_request(tiny_recipe, DECODER_INPUTS, ShapeRequest())["latent"]
    encoder = profile_from_request(tiny_recipe, ENCODER_INPUTS, ShapeRequest())["images"]
    assert decoder == {"min": [1, 4, 4, 4], "opt": [1, 4, 8, 8], "max": [4, 4, 16, 16]}
    assert encoder == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [4, 3, 128, 128]}


def test_every_level_is_ordered(tiny_recipe):
    for inputs in (UNET_INPUTS, DECODER_INPUTS, ENCODER_INPUTS, TEXT_INPUTS):
        for levels in profile_from_request(tiny_recipe, inputs, ShapeRequest()).values():
            assert all(lo <= op <= hi for lo, op, hi in zip(levels["min"], levels["opt"], levels["max"]))


def test_default_profile_is_what_export_records(tiny_recipe):
    from sdcompile.components import component_spec, recipe_component_names
    from sdcompile.components.spec import input_profile

    for name in recipe_component_names(tiny_recipe):
        spec = component_spec(name, tiny_recipe)
        assert profile_from_request(tiny_recipe, spec.inputs, ShapeRequest()) == input_profile(spec, tiny_recipe), name


def test_overrides_replace_only_the_given_values(tiny_recipe):
    profile = profile_from_request(tiny_recipe, UNET_INPUTS, overrides(opt="batch=2,height=96", max="width=160"))
    assert profile["sample"] == {"min": [1, 4, 4, 4], "opt": [4, 4, 12, 8], "max": [8, 4, 16, 20]}


def test_static_pins_every_level_to_opt_with_guidance(tiny_recipe):
    request = ShapeRequest(ShapeMode.STATIC, {"opt": {"batch": 2, "height": 96, "width": 64}})
    unet = profile_from_request(tiny_recipe, UNET_INPUTS, request)
    decoder = profile_from_request(tiny_recipe, DECODER_INPUTS, request)
    assert unet["sample"] == {level: [4, 4, 12, 8] for level in ("min", "opt", "max")}
    assert decoder["latent"] == {level: [2, 4, 12, 8] for level in ("min", "opt", "max")}
    assert is_static(unet) and is_static(decoder)
    assert not is_static(profile_from_request(tiny_recipe, UNET_INPUTS, ShapeRequest()))


def test_static_takes_no_min_or_max(tiny_recipe):
    request = ShapeRequest(ShapeMode.STATIC, {"max": {"batch": 2}})
    with pytest.raises(UserError, match="--opt only"):
        profile_from_request(tiny_recipe, UNET_INPUTS, request)


def test_sizes_must_be_multiples_of_the_recipe_size_multiple(tiny_recipe):
    assert tiny_recipe.size_multiple == 16
    with pytest.raises(UserError, match="multiples of 16") as caught:
        profile_from_request(tiny_recipe, UNET_INPUTS, overrides(opt="height=72"))
    assert "--opt height=72" in caught.value.message()


def test_batch_below_one_is_refused(tiny_recipe):
    with pytest.raises(UserError, match="at least 1"):
        profile_from_request(tiny_recipe, UNET_INPUTS, overrides(min="batch=0"))
    with pytest.raises(UserError, match="at least 1"):
        profile_from_request(tiny_recipe, UNET_INPUTS, overrides(min="batch=-2"))


def test_unordered_levels_are_refused(tiny_recipe):
    with pytest.raises(UserError, match="min <= opt <= max") as caught:
        profile_from_request(tiny_recipe, UNET_INPUTS, overrides(opt="batch=8"))
    assert "--opt batch=8" in caught.value.message()
    with pytest.raises(UserError, match="min <= opt <= max"):
        profile_from_request(tiny_recipe, UNET_INPUTS, overrides(min="width=96", opt="width=64"))


@pytest.mark.parametrize("text", ["depth=3", "batch", "batch=two", "batch=2,,", "height=1.5"])
def test_unreadable_overrides_are_refused(text):
    with pytest.raises(UserError, match="cannot read --opt"):
        parse_shape_override("opt", text)


def test_override_text_is_read():
    assert parse_shape_override("opt", "batch=2, height=768,width=512") == {"batch": 2, "height": 768, "width": 512}
    assert parse_shape_override("min", None) == {}


def test_profile_within_the_graph_dims_is_accepted(tiny_recipe):
    profile = profile_from_request(tiny_recipe, UNET_INPUTS, ShapeRequest())
    graph = {"sample": ("B", 4, "h", "w"), "timestep": (1,), "encoder_hidden_states": ("B", "context_tokens", 32)}
    check_profile_against_graph("unet", profile, graph)


def test_override_outside_a_fixed_graph_dim_is_refused(tiny_recipe):
    graph = {"sample": (2, 4, "h", "w"), "timestep": (1,), "encoder_hidden_states": (2, 77, 32)}
    static_two = ShapeRequest(ShapeMode.STATIC, {"opt": {"batch": 1}})
    check_profile_against_graph("unet", profile_from_request(tiny_recipe, UNET_INPUTS, static_two), graph)
    request = ShapeRequest(ShapeMode.STATIC, {"opt": {"batch": 2}})
    with pytest.raises(UserError, match="fixed to 2 in the ONNX graph") as caught:
        check_profile_against_graph("unet", profile_from_request(tiny_recipe, UNET_INPUTS, request), graph)
    assert "asks for 4" in caught.value.message()


def test_graph_with_other_inputs_or_rank_is_refused(tiny_recipe):
    profile = profile_from_request(tiny_recipe, DECODER_INPUTS, ShapeRequest())
    with pytest.raises(UserError, match="rank 3"):
        check_profile_against_graph("vae_decoder", profile, {"latent": ("B", 4, "h")})
    with pytest.raises(UserError, match="not an input of the ONNX graph"):
        check_profile_against_graph("vae_decoder", profile, {})
    with pytest.raises(UserError, match="does not describe"):
        check_profile_against_graph("vae_decoder", profile, {"latent": ("B", 4, "h", "w"), "extra": (1,)})


def _attention_graph(path):
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT16, ["batch", 2, 16, 8])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 2, 16, 8])
    node = helper.make_node("Attention", ["q", "q", "q"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [q, t], [y]),
                              opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(model, str(path))


def test_graph_info_reads_dims_and_operators(tmp_path):
    _attention_graph(tmp_path / "model.onnx")
    info = graph_info_from_onnx(tmp_path / "model.onnx")
    assert info.input_dims == {"q": ("batch", 2, 16, 8), "t": (1,)}
    assert "Attention" in info.op_types


def test_attention_needs_tensorrt_10_14(tmp_path):
    _attention_graph(tmp_path / "model.onnx")
    info = graph_info_from_onnx(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="Attention operator") as caught:
        check_parser_supports("10.13.0.35", info, "unet")
    assert "10.14" in caught.value.message()
    check_parser_supports("10.14.1.48", info, "unet")
    check_parser_supports("11.1.0.7", info, "unet")
