"""Checkpoint reading/writing, restricted unpickling, strict loading reports and seeded random weights."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from sdcompile.recipes import TextActivation, TextEncoderKind, TextOutputLayer, TokenizerPadding
from sdcompile.weights import (InertStandIn, RandomWeights, RefusedGlobal, ldm_state_dict, load_models,
                               random_tensor, read_state_dict_file, resolve_global, save_ldm_checkpoint,
                               unwrap_state_dict)
from sdrun.errors import UserError

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
COUNTS = re.compile(r"(\d+) missing, (\d+) unexpected and (\d+) mis-shaped keys")


@pytest.fixture(scope="module")
def tiny_models():
    from sdcompile.recipes import load_recipe

    return load_models(load_recipe("tiny"), RandomWeights(7))


@pytest.fixture
def tiny_state(tiny_models) -> dict[str, torch.Tensor]:
    return ldm_state_dict(tiny_models)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def tiny_with_openclip(tiny):
    """The tiny recipe with an SD2-style OpenCLIP text encoder of another width."""
    text = dataclasses.replace(tiny.text_encoder, kind=TextEncoderKind.OPENCLIP, width=48, heads=3, layers=3,
                               activation=TextActivation.GELU, output_layer=TextOutputLayer.PENULTIMATE,
                               padding=TokenizerPadding.ZERO)
    unet = dataclasses.replace(tiny.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                               context_dim=48)
    return dataclasses.replace(tiny, name="tiny-openclip", unet=unet, text_encoder=text)


# --- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(tmp_path, tiny_recipe, tiny_models, suffix):
    path = save_ldm_checkpoint(tiny_models, tmp_path / f"tiny{suffix}")
    loaded = load_models(tiny_recipe, path)
    assert_same_weights(ldm_state_dict(tiny_models), ldm_state_dict(loaded))
    assert loaded.report.skipped == () and loaded.report.filled == ()
    assert not list(tmp_path.glob(".*partial")), "temporary file left behind"


def test_fp16_file_loads_as_fp32(tmp_path, tiny_recipe, tiny_models):
    half = load_models(tiny_recipe, RandomWeights(7), dtype=torch.float16)
    path = save_ldm_checkpoint(half, tmp_path / "half.safetensors")
    loaded = load_models(tiny_recipe, path, dtype=torch.float32)
    assert loaded.report.file_dtypes == ("float16",)
    stored_state = ldm_state_dict(half)
    for key, value in ldm_state_dict(loaded).items():
        stored = stored_state[key]
        expected_dtype = torch.float32 if stored.is_floating_point() else stored.dtype
        assert value.dtype == expected_dtype and torch.equal(value, stored.to(value.dtype)), key


def test_nested_state_dict_is_unwrapped():
    weights = {"a": torch.ones(1)}
    assert unwrap_state_dict({"state_dict": {"state_dict": weights}, "global_step": 3}) is weights


# --- restricted unpickling -------------------------------------------------------------------------------


def lightning_stand_ins(monkeypatch) -> dict[str, type]:
    """Classes whose pickled names are those of training-library objects (the libraries need not exist)."""
    classes = {}
    for module_name, class_name, base in [
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", object),
        ("pytorch_lightning.utilities.parsing", "AttributeDict", dict),
        ("omegaconf.dictconfig", "DictConfig", object),
    ]:
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        cls = type(class_name, (base,), {"__module__": module_name, "__qualname__": class_name})
        setattr(sys.modules[module_name], class_name, cls)
        classes[class_name] = cls
    return classes


def test_lightning_checkpoint_with_training_records_loads(tmp_path, monkeypatch, tiny_recipe, tiny_state):
    import numpy as np

    cls = lightning_stand_ins(monkeypatch)
    hparams = cls["AttributeDict"](lr=1e-4, name="run")
    config = cls["DictConfig"]()
    config.content = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion"}}
    path = tmp_path / "lightning.ckpt"
    torch.save({
        "state_dict": tiny_state,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {cls["ModelCheckpoint"]: {"best_model_score": torch.tensor(0.5), "dirpath": "logs/ckpts"}},
        "hyper_parameters": hparams,
        "config": config,
        "best_loss": np.float64(0.123),
        "lr_schedulers": [{"_last_lr": [1e-4]}],
    }, path)
    monkeypatch.undo()  # loading must not need the training libraries
    loaded = load_models(tiny_recipe, path)
    assert_same_weights(tiny_state, ldm_state_dict(loaded))


class _WritesMarker:
    def __init__(self, how: str, marker: str):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "builtins.exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return subprocess.Popen, (["touch", self.marker],)


@pytest.mark.parametrize("how, refused_name", [
    ("os.system", os.system.__module__ + ".system"),
    ("builtins.exec", "builtins.exec"),
    ("subprocess.Popen", "subprocess.Popen"),
])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, tiny_recipe, tiny_state, how,
                                                              refused_name):
    marker = tmp_path / "marker"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": tiny_state | {"payload": _WritesMarker(how, str(marker))}}, path)
    assert not marker.exists()
    with pytest.raises(UserError) as info:
        load_models(tiny_recipe, path)
    assert refused_name in str(info.value) and "safetensors" in info.value.fix
    assert not marker.exists(), "the checkpoint ran code"


def test_global_resolution_allows_tensors_and_stands_in_for_training_records():
    assert resolve_global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") is InertStandIn
    assert resolve_global("numpy.core.multiarray", "scalar") is InertStandIn
    assert resolve_global("torch", "float16") is torch.float16
    for module, name in [("torch", "load"), ("torch.hub", "load"), ("builtins", "getattr"), ("posix", "system"),
                         ("__main__", "Anything"), ("torch", "_dynamo")]:
        with pytest.raises(RefusedGlobal):
            resolve_global(module, name)


# --- user errors -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path, tiny_recipe):
    with pytest.raises(UserError, match="does not exist") as info:
        load_models(tiny_recipe, tmp_path / "nothing.safetensors")
    assert info.value.expected and info.value.got and info.value.fix


@pytest.mark.parametrize("suffix, message", [(".safetensors", "not a readable .safetensors"),
                                             (".ckpt", "damaged or not a model checkpoint")])
def test_truncated_file(tmp_path, tiny_recipe, tiny_models, suffix, message):
    path = save_ldm_checkpoint(tiny_models, tmp_path / f"tiny{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=message) as info:
        load_models(tiny_recipe, path)
    assert info.value.fix


def test_directory_without_components(tmp_path, tiny_recipe):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="not a diffusers pipeline folder") as info:
        load_models(tiny_recipe, tmp_path)
    assert "vae/" in info.value.got and "text_encoder/" in info.value.got


def test_component_folder_without_weights(tmp_path, tiny_recipe):
    for name in ("unet", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no weights file"):
        load_models(tiny_recipe, tmp_path)


def test_unknown_suffix(tmp_path, tiny_recipe):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_models(tiny_recipe, path)


# --- strict loading reports ------------------------------------------------------------------------------


def test_sd1_checkpoint_into_openclip_recipe_reports_counts_examples_and_family(tmp_path, tiny_recipe,
                                                                                tiny_models):
    path = save_ldm_checkpoint(tiny_models, tmp_path / "sd1.safetensors")
    with pytest.raises(UserError) as info:
        load_models(tiny_with_openclip(tiny_recipe), path)
    error = info.value
    assert tuple(map(int, COUNTS.search(error.problem).groups())) == (28, 37, 28)
    assert "text_encoder:" in error.got and "model.token_embedding.weight" in error.got
    assert "unet:" in error.got and "attn2.to_k.weight" in error.got
    assert "CLIP in Hugging Face layout" in error.fix and "sd15" in error.fix
    assert "context width 32" in error.fix and "are linear" not in error.fix
    assert "1×1 convolutions (SD 1.x)" in error.fix


def test_checkpoint_of_another_unet_config_reports_counts(tmp_path, tiny_recipe, tiny_models):
    path = save_ldm_checkpoint(tiny_models, tmp_path / "tiny.safetensors")
    deeper = dataclasses.replace(tiny_recipe, unet=dataclasses.replace(tiny_recipe.unet, num_res_blocks=2))
    with pytest.raises(UserError) as info:
        load_models(deeper, path)
    missing, unexpected, misshaped = map(int, COUNTS.search(info.value.problem).groups())
    assert missing > 0 and unexpected > 0 and misshaped > 0
    assert "unet:" in info.value.got and "vae:" not in info.value.got and "text_encoder:" not in info.value.got
    assert "…" in info.value.got  # more than the examples shown


def test_unrecognised_top_level_keys_are_unexpected(tmp_path, tiny_recipe, tiny_state):
    path = tmp_path / "extra.safetensors"
    save_file(tiny_state | {"conditioner.embedders.0.weight": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match="1 unexpected") as info:
        load_models(tiny_recipe, path)
    assert "conditioner.embedders.0.weight" in info.value.got and "SDXL" in info.value.fix


def test_ema_keys_and_ddpm_buffers_are_skipped_and_reported(tmp_path, tiny_recipe, tiny_state):
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000),
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(32, 4, 3, 3),
        "betas": torch.ones(1000), "alphas_cumprod": torch.ones(1000), "posterior_mean_coef2": torch.ones(1000),
    }
    path = tmp_path / "full.safetensors"
    save_file(tiny_state | extras, str(path))
    loaded = load_models(tiny_recipe, path)
    groups = {group.reason: group for group in loaded.report.skipped}
    assert groups["EMA keys (model_ema.*)"].count == 3
    assert groups["DDPM schedule buffers"].count == 3
    assert "betas" in groups["DDPM schedule buffers"].examples
    assert any("skipped 3 EMA keys" in line for line in loaded.report.lines())
    assert_same_weights(tiny_state, ldm_state_dict(loaded))


def test_absent_position_ids_are_filled(tmp_path, tiny_recipe, tiny_state):
    path = tmp_path / "no_position_ids.safetensors"
    save_file({k: v for k, v in tiny_state.items() if k != POSITION_IDS}, str(path))
    loaded = load_models(tiny_recipe, path)
    assert torch.equal(ldm_state_dict(loaded)[POSITION_IDS], torch.arange(77)[None])
    assert [group.examples for group in loaded.report.filled] == [(POSITION_IDS.removeprefix("cond_stage_model."),)]


def test_openclip_checkpoint_without_unused_keys_loads(tmp_path, tiny_recipe):
    recipe = tiny_with_openclip(tiny_recipe)
    state = ldm_state_dict(load_models(recipe, RandomWeights(3)))
    unused = [k for k in state if k.startswith("cond_stage_model.model.transformer.resblocks.2.")
              or k in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")]
    path = tmp_path / "pruned.safetensors"
    save_file({k: v for k, v in state.items() if k not in unused}, str(path))
    loaded = load_models(recipe, path)
    (group,) = loaded.report.filled
    assert group.count == len(unused) == 14
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    reference = load_models(recipe, RandomWeights(3))
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids), reference.text_encoder(ids))


# --- seeded random weights -------------------------------------------------------------------------------


def test_random_weights_are_deterministic_per_seed(tiny_recipe, tiny_state):
    again = ldm_state_dict(load_models(tiny_recipe, RandomWeights(7)))
    other = ldm_state_dict(load_models(tiny_recipe, RandomWeights(8)))
    assert_same_weights(tiny_state, again)
    for key, value in tiny_state.items():
        if value.is_floating_point():
            assert not torch.equal(value, other[key]), key


def test_random_weights_initialise_every_parameter_sanely(tiny_models, tiny_state):
    parameters = {k for c in ("unet", "vae", "text_encoder") for k, _ in getattr(tiny_models, c).named_parameters()}
    for key, value in tiny_state.items():
        if key == POSITION_IDS:
            assert torch.equal(value, torch.arange(77)[None])
            continue
        assert value.abs().max() > 0, f"{key} is zero"
        if value.ndim == 1 and key.endswith("weight"):
            assert (value - 1).abs().max() < 0.2, f"{key}: a norm scale should be about 1"
    assert len(parameters) == len(tiny_state) - 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny_models.unet(x, torch.tensor([500.0]), context)
    assert 0.1 < out.std() < 10, "UNet output is trivially small or exploding"


def test_random_tensor_depends_on_name_and_seed_only():
    a = random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=1)
    assert torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=1))
    assert not torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 32, 3, 3), seed=2))
    assert abs(a.std().item() - (32 * 9) ** -0.5) < 0.01


def test_read_state_dict_file_reads_both_formats(tmp_path, tiny_models, tiny_state):
    for suffix in (".safetensors", ".ckpt"):
        path = save_ldm_checkpoint(tiny_models, tmp_path / f"tiny{suffix}")
        assert_same_weights(tiny_state, read_state_dict_file(path))


def test_sd1_text_keys_saved_without_text_model_wrapper_load(tmp_path, tiny_recipe, tiny_state):
    flattened = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
                 for key, value in tiny_state.items()}
    path = tmp_path / "flattened.safetensors"
    save_file(flattened, str(path))
    assert_same_weights(tiny_state, ldm_state_dict(load_models(tiny_recipe, path)))
