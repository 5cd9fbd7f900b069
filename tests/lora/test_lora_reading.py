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


def test_text_encoder_loras_for_the_openclip_encoder_are_refused_for_now(tmp_path):
    from sdcompile.recipes import load_recipe
    from sdrun.errors import UserError
    from sdrun.lora import lora_deltas, read_lora

    down, up = pair()
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = save(tmp_path / "te.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(UserError, match="OpenCLIP"):
        lora_deltas([(read_lora(path), 1.0)], "text_encoder", {key: (96, 32)}, load_recipe("tiny-v"))
