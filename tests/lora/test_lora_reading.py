"""The numpy core on hand-made files: the layouts agree, alpha scales, options and prompt tags parse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
Q_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
SHAPES = {Q_KEY: (32, 32)}


def pair(seed=0, rank=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rank, 32), dtype=np.float32), rng.standard_normal((32, rank), dtype=np.float32)


def save(path: Path, tensors: dict, metadata=None) -> Path:
    import safetensors.numpy

    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path


def delta(path: Path, recipe, scale=1.0):
    from sdrun.lora import lora_deltas, read_lora

    deltas, touched = lora_deltas([(read_lora(path), scale)], "unet", SHAPES, recipe)
    return dict(deltas)[Q_KEY], touched


def test_every_layout_gives_scale_times_alpha_over_rank_times_up_down(tmp_path, tiny_recipe):
    down, up = pair()
    expected = 0.5 * (8 / 4) * up @ down
    files = {
        "kohya": {f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": down,
                  f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": up,
                  f"lora_unet_{Q.replace('.', '_')}.alpha": np.array(8, np.float32)},
        "peft": {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up},
        "diffusers_old": {f"unet.{Q}.lora.down.weight": down, f"unet.{Q}.lora.up.weight": up},
    }
    metadata = {"lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": 8}})}
    for name, tensors in files.items():
        path = save(tmp_path / f"{name}.safetensors", tensors, None if name == "kohya" else metadata)
        got, touched = delta(path, tiny_recipe, scale=0.5)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)
        assert touched == [1]


def test_without_alpha_alpha_is_the_rank(tmp_path, tiny_recipe):
    down, up = pair(rank=2)
    path = save(tmp_path / "a.safetensors", {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up})
    np.testing.assert_allclose(delta(path, tiny_recipe)[0], up @ down, rtol=1e-6)


def test_fp16_kohya_locon_3x3_conv(tmp_path, tiny_recipe):
    from sdrun.lora import lora_deltas, read_lora

    rng = np.random.default_rng(1)
    down = rng.standard_normal((4, 32, 3, 3)).astype(np.float16)
    up = rng.standard_normal((32, 4, 1, 1)).astype(np.float16)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = save(tmp_path / "locon.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                                 f"{name}.alpha": np.array(2, np.float16)})
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    deltas = dict(lora_deltas([(read_lora(path), 1.0)], "unet", {key: (32, 32, 3, 3)}, tiny_recipe)[0])
    expected = np.einsum("or,rikl->oikl", up[:, :, 0, 0].astype(np.float32), down.astype(np.float32)) * 2 / 4
    np.testing.assert_allclose(deltas[key], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, path, scale", [
    ("a.safetensors", "a.safetensors", 1.0),
    ("dir/a.safetensors:0.7", "dir/a.safetensors", 0.7),
    ("a.safetensors:-0.3", "a.safetensors", -0.3),
    ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),
])
def test_lora_option(text, path, scale):
    from sdrun.lora import parse_lora_option

    request = parse_lora_option(text)
    assert (str(request.path), request.scale) == (path, scale)


def test_prompt_tags_are_removed_and_resolved_in_the_lora_dir():
    from sdrun.lora import prompt_lora_tags

    prompt, requests = prompt_lora_tags("a <lora:ink:0.6> cat, <lora:film> at dusk", Path("/loras"))
    assert prompt == "a cat, at dusk"
    assert [(str(r.path), r.scale) for r in requests] == [("/loras/ink.safetensors", 0.6),
                                                          ("/loras/film.safetensors", 1.0)]


def test_underscore_names_that_two_paths_share_resolve_to_neither():
    from sdrun.lora.names import kohya_table

    table = kohya_table({"a.b_c": "k1", "a_b.c": "k2", "d.e": "k3"})
    assert table == {"a_b_c": None, "d_e": "k3"}


def test_bfloat16_files_are_widened_exactly(tmp_path, tiny_recipe):
    import safetensors.torch
    import torch

    down, up = pair()
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.from_numpy(down).bfloat16(),
                                 f"unet.{Q}.lora_B.weight": torch.from_numpy(up).bfloat16()}, str(path))
    expected = torch.from_numpy(up).bfloat16().float() @ torch.from_numpy(down).bfloat16().float()
    np.testing.assert_allclose(delta(path, tiny_recipe)[0], expected.numpy(), rtol=1e-6, atol=1e-6)


def kohya_tensors(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """kohya name -> (down, up) as a file's tensors, alpha = rank."""
    tensors = {}
    for name, (down, up) in modules.items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": np.array(down.shape[0], np.float32)}
    return tensors


def wide_pair(seed, width, out=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, width), dtype=np.float32), rng.standard_normal((out or width, 4), dtype=np.float32)


def test_openclip_q_k_v_modules_add_to_row_blocks_of_the_stacked_in_projection(tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.lora import lora_deltas, read_lora

    width = 48  # tiny-v's text encoder; in_proj_weight (3·48, 48) stacks [q; k; v]
    layer = "lora_te_text_model_encoder_layers_1_"
    modules = {f"{layer}self_attn_q_proj": wide_pair(0, width), f"{layer}self_attn_v_proj": wide_pair(1, width),
               f"{layer}mlp_fc1": wide_pair(2, width, 4 * width)}
    path = save(tmp_path / "te.safetensors", kohya_tensors(modules))
    block = "cond_stage_model.model.transformer.resblocks.1."
    shapes = {f"{block}attn.in_proj_weight": (3 * width, width), f"{block}mlp.c_fc.weight": (4 * width, width),
              f"{block}attn.out_proj.weight": (width, width)}
    deltas, touched = lora_deltas([(read_lora(path), 1.0)], "text_encoder", shapes, load_recipe("tiny-v"))
    deltas = dict(deltas)
    (q_down, q_up), (v_down, v_up), (fc_down, fc_up) = modules.values()
    in_proj = deltas[f"{block}attn.in_proj_weight"]
    np.testing.assert_allclose(in_proj[:width], q_up @ q_down, rtol=1e-6)
    np.testing.assert_array_equal(in_proj[width:2 * width], 0)
    np.testing.assert_allclose(in_proj[2 * width:], v_up @ v_down, rtol=1e-6)
    np.testing.assert_allclose(deltas[f"{block}mlp.c_fc.weight"], fc_up @ fc_down, rtol=1e-6)
    assert touched == [2] and len(deltas) == 2


def test_an_openclip_k_proj_delta_of_the_whole_in_projection_size_is_refused(tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.errors import UserError
    from sdrun.lora import lora_deltas, read_lora

    name = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    path = save(tmp_path / "te.safetensors", kohya_tensors({name: wide_pair(0, 48, 3 * 48)}))
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(UserError, match=r"(?s)row block 1 of 3.*\[48, 48\]"):
        lora_deltas([(read_lora(path), 1.0)], "text_encoder", {key: (144, 48)}, load_recipe("tiny-v"))


@pytest.mark.parametrize("name, model, key, shape", [
    ("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder",
     "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight", (32, 32)),
    ("lora_te2_text_model_encoder_layers_2_mlp_fc2", "text_encoder_2",
     "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight", (32, 128)),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_attn2_to_k", "unet",
     "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight", (64, 64)),
    # kohya's SDXL trainer names the UNet's modules by their ldm paths
    ("lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k", "unet",
     "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight", (64, 64)),
    ("lora_unet_output_blocks_2_2_conv", "unet", "model.diffusion_model.output_blocks.2.2.conv.weight",
     (64, 64, 3, 3)),
])
def test_sdxl_kohya_names_resolve_to_the_sdxl_single_file_keys(name, model, key, shape, tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.lora import lora_deltas, read_lora

    down, up = wide_pair(0, int(np.prod(shape[1:])), shape[0])
    path = save(tmp_path / "xl.safetensors", kohya_tensors({name: (down, up)}))
    deltas = dict(lora_deltas([(read_lora(path), 1.0)], model, {key: shape}, load_recipe("tiny-xl"))[0])
    np.testing.assert_allclose(deltas[key], (up @ down).reshape(shape), rtol=1e-6)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-v"])
def test_a_second_text_encoder_lora_is_refused_naming_sdxl(recipe, tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.errors import UserError
    from sdrun.lora import lora_deltas, read_lora

    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    path = save(tmp_path / "te2.safetensors", kohya_tensors({name: wide_pair(0, 32)}))
    with pytest.raises(UserError, match="text_encoder_2.*SDXL"):
        lora_deltas([(read_lora(path), 1.0)], "unet", SHAPES, load_recipe(recipe))


def test_modules_of_a_block_no_output_reads_are_dropped_where_the_graph_lacks_its_weights(tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.lora import lora_deltas, read_lora

    # tiny-xl's CLIP encoder has 2 blocks and SDXL reads the hidden states before the last: an export prunes it
    layers = "conditioner.embedders.0.transformer.text_model.encoder.layers."
    modules = {f"lora_te1_text_model_encoder_layers_{i}_mlp_fc2": wide_pair(i, 128, 32) for i in (0, 1)}
    path = save(tmp_path / "te1.safetensors", kohya_tensors(modules))
    graph = {f"{layers}0.mlp.fc2.weight": (32, 128)}
    model = graph | {f"{layers}1.mlp.fc2.weight": (32, 128)}
    for shapes in (graph, model):
        deltas = dict(lora_deltas([(read_lora(path), 1.0)], "text_encoder", shapes, load_recipe("tiny-xl"))[0])
        assert sorted(deltas) == sorted(shapes)
