"""LoRA files for the tests, in the published layouts: random PEFT adapters on the diffusers twin of a
tiny model, saved by diffusers (`unet.….lora_A.weight`), and the same tensors written in the kohya /
web-UI layout (`lora_unet_…​.lora_down.weight`, 0-dim `.alpha`; `lora_te1_` / `lora_te2_` for SDXL).

The adapters cover attention projections, a 1×1 conv (the tiny UNet's `proj_in`), 3×3 convs (LoCon:
3×3 down, 1×1 up), a linear layer of the time embedding and the text encoder's projections and MLP.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
KOHYA_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}
SDXL_KOHYA_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}


def peer_pipeline(recipe):
    from benchmarks.peer import diffusers_pipeline_from_models
    from sdcompile.weights import RandomWeights, load_models

    return diffusers_pipeline_from_models(load_models(recipe, RandomWeights(0)), recipe)


def peft_lora_file(recipe, path: Path, seed: int, unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS) -> Path:
    """A diffusers-saved LoRA (rank 4, alpha = rank, every lora_B random and nonzero) on the tiny model."""
    from diffusers import StableDiffusionPipeline

    pipe = peer_pipeline(recipe)
    models = {"unet": (pipe.unet, unet_targets), "text_encoder": (pipe.text_encoder, text_targets)}
    StableDiffusionPipeline.save_lora_weights(str(path.parent), weight_name=path.name,
                                              **random_adapters(models, seed))
    return path


def random_adapters(models: dict, seed: int) -> dict:
    """`models`: name -> (module, PEFT target module names); per model with targets, its adapter's state dict
    as diffusers' `save_lora_weights` takes it (`<name>_lora_layers`)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (model, targets) in models.items():
        if not targets:
            continue
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), model)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
    return layers


def diffusers_with_loras(recipe, loras: list[tuple[Path, float]]):
    """The diffusers twin with `loras` (diffusers-saved files, scale): the UNet's through diffusers'
    `load_lora_weights` (fused with `fuse_lora` for one LoRA, weighted by `set_adapters` for several), the
    text encoder's injected and merged by PEFT (transformers' own loader needs a newer PEFT than PyPI has)."""
    return pipeline_with_loras(peer_pipeline(recipe), loras, {"text_encoder": TEXT_TARGETS})


def pipeline_with_loras(pipe, loras: list[tuple[Path, float]], text_targets: dict[str, list[str]]):
    """`pipe` with `loras` as `diffusers_with_loras` applies them; `text_targets`: text encoder -> PEFT
    targets."""
    import safetensors.torch

    names = [f"lora{i}" for i in range(len(loras))]
    states = [safetensors.torch.load_file(str(path)) for path, _ in loras]
    for name, state in zip(names, states):
        pipe.load_lora_weights({k: v for k, v in state.items() if k.startswith("unet.")}, adapter_name=name)
    for encoder, targets in text_targets.items():
        prefix = f"{encoder}."
        adapters = [{k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)} for state in states]
        peft_merged_(getattr(pipe, encoder), targets, adapters, [scale for _, scale in loras])
    if len(loras) == 1:
        pipe.fuse_lora(components=["unet"], lora_scale=loras[0][1], adapter_names=names)
    else:
        pipe.set_adapters(names, [scale for _, scale in loras])
    return pipe


def peft_merged_(model, targets: list[str], adapters: list[dict], scales: list[float]) -> None:
    """Each adapter state dict injected into `model` by PEFT, then all merged at their scales."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    names = [f"lora{i}" for i in range(len(adapters))]
    for name, state in zip(names, adapters):
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), model,
                                adapter_name=name)
        set_peft_model_state_dict(model, state, adapter_name=name)
    for module in model.modules():  # merged once all are injected: injecting unmerges
        if isinstance(module, LoraLayer):
            for name, scale in zip(names, scales):
                module.scaling[name] *= scale
            module.merge(adapter_names=names)


def kohya_copy(diffusers_file: Path, path: Path, prefixes=KOHYA_PREFIXES) -> Path:
    """The same LoRA in kohya's layout: dotted module paths joined by underscores, alpha stored per module."""
    import safetensors.numpy

    roles = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    out = {}
    for key, value in safetensors.numpy.load_file(str(diffusers_file)).items():
        model = next(p for p in prefixes if key.startswith(p))
        role = next(r for r in roles if key.endswith(r))
        module = key[len(model):-len(role)]
        if model != "unet." and not module.startswith("text_model."):
            module = f"text_model.{module}"  # kohya names the transformers 4 module path
        name = prefixes[model] + module.replace(".", "_")
        out[name + roles[role]] = value
        out[name + ".alpha"] = np.array(RANK, dtype=np.float32)
    safetensors.numpy.save_file(out, str(path))
    return path
