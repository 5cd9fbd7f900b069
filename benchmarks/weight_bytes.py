"""How many fp32 weight bytes each component's graph holds, counted on the eager model.

A component's weights are the parameters its wrapper's forward reaches (the VAE decoder graph
holds the decoder, not the encoder), found by running the forward once with hooks. Models are
built on the meta device, so sd15 costs seconds and no memory; a component whose meta build or
forward fails is counted on the recipe's random-weight models instead. The count is numel × 4
bytes whatever the export's precision: the fp32 size, the export's own reference point.
"""
from __future__ import annotations

from typing import Callable

import torch

FP32_BYTES = 4


def fp32_weight_bytes(recipe, names: list[str], seed: int = 0,
                      log: Callable[[str], None] = print) -> dict[str, int]:
    """name -> fp32 bytes of its parameters for each base component in `names`, and "all" -> their union."""
    meta, loaded, used = _meta_models(recipe), None, {}
    for name in names:
        try:
            used[name] = used_parameters(name, meta, recipe)
        except Exception as err:  # noqa: BLE001 - counted again on real weights below
            log(f"{name}: parameters not countable on the meta device ({type(err).__name__}: {err}); "
                "counting them on loaded random weights")
            loaded = loaded or _loaded_models(recipe, seed)
            used[name] = used_parameters(name, loaded, recipe)
    union = {key: numel for parameters in used.values() for key, numel in parameters.items()}
    return {**{name: FP32_BYTES * sum(p.values()) for name, p in used.items()}, "all": FP32_BYTES * sum(union.values())}


def used_parameters(name: str, models, recipe) -> dict[int, int]:
    """id -> numel of every parameter the component's forward reaches, at the trace shapes."""
    from sdcompile.components import component_spec
    from sdcompile.components.spec import trace_binding

    if models is None:
        raise RuntimeError("the models could not be built on the meta device")
    spec = component_spec(name, recipe)
    module = spec.wrap(models, recipe).eval()
    device = next(module.parameters()).device
    inputs = spec.sample(recipe, trace_binding(recipe), torch.Generator().manual_seed(0))
    reached: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, args, out: reached.append(m)) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*(inputs[t.name].to(device) for t in spec.inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return {id(p): p.numel() for m in reached for p in m.parameters(recurse=False)}


def _meta_models(recipe):
    """The recipe's models with meta tensors (no storage), or None where construction fails."""
    from sdcompile.weights.layout import ldm_prefixes
    from sdcompile.weights.loading import StableDiffusionModels, build_models

    try:
        with torch.device("meta"):
            modules = build_models(recipe)
    except Exception:  # noqa: BLE001 - every component falls back to loaded weights
        return None
    return StableDiffusionModels(**{"unet": None, "vae": None, "text_encoder": None,
                                    **{part.value: module for part, module in modules.items()}},
                                 report=None, prefixes=ldm_prefixes(recipe))


def _loaded_models(recipe, seed: int):
    from sdcompile.weights import RandomWeights, load_models

    return load_models(recipe, RandomWeights(seed))
