"""ldm single files: `.safetensors`, or pickled `.ckpt` / `.pt` / `.pth` / `.bin` (restricted
unpickler), split into components by key prefix."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sdcompile import diffusers_layout
from sdcompile.recipes import Recipe, TextEncoderKind
from sdcompile.weights.layout import LDM_PREFIXES, CheckpointStates, Component, StateDict, ldm_prefixes
from sdcompile.weights.load_report import KeyGroup, LoadReport, float_dtypes
from sdcompile.weights.safetensors_extent import REDOWNLOAD_FIX, check_safetensors_extent
from sdcompile.weights.unpickler import read_pickled
from sdrun.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
# `DDPM.register_schedule` buffers (ldm/models/diffusion/ddpm.py); we recompute them from the recipe.
DDPM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights",
})


def read_ldm_file(path: Path, recipe: Recipe) -> tuple[CheckpointStates, LoadReport]:
    """Per-component tensors (our key layout) of an ldm single file, and what was skipped."""
    split = split_ldm_state_dict(read_raw_state_dict(path), ldm_prefixes(recipe))
    components = dict(split.components)
    clip = [c for c, text in zip((Component.TEXT_ENCODER, Component.TEXT_ENCODER_2), recipe.text_encoders)
            if text.kind is TextEncoderKind.CLIP]
    for component in clip:
        components[component] = clip_text_normalized(components.get(component, {}))
    report = LoadReport(f"ldm checkpoint {path}", float_dtypes(components.values()), split.skipped)
    return CheckpointStates(components, split.unrecognised), report


def read_state_dict_file(path: Path) -> StateDict:
    """The tensors of one `.safetensors` file or pickled checkpoint, nested `state_dict`s unwrapped."""
    raw = read_raw_state_dict(path)
    return {key: value for key, value in raw.items() if isinstance(value, torch.Tensor)}


def read_raw_state_dict(path: Path) -> dict[str, object]:
    """Like `read_state_dict_file`, keeping the non-tensor entries a pickled state_dict may hold."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        state = unwrap_state_dict(read_pickled(path))
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state_dict.", expected="a dict of tensors (or one under "
                            '"state_dict")', got=type(state).__name__, fix="pass a model checkpoint")
        return {str(key): value for key, value in state.items()}
    raise UserError(f"{path}: unknown checkpoint format {path.suffix!r}.",
                    expected=f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}", got=path.suffix or "no suffix",
                    fix="rename the file to its format's suffix, or pass a diffusers folder")


def read_safetensors(path: Path) -> StateDict:
    """The tensors of `path`, once its header shows every tensor is complete."""
    check_safetensors_extent(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable .safetensors file: {err}.",
                        expected="a complete safetensors file (8-byte header length, JSON header, tensor data)",
                        got=f"{path.stat().st_size} bytes", fix=REDOWNLOAD_FIX) from None


def unwrap_state_dict(obj: object) -> object:
    """Lightning checkpoints hold the weights in `["state_dict"]`, sometimes nested."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


@dataclasses.dataclass(frozen=True)
class LdmSplit:
    components: dict[Component, StateDict]
    skipped: tuple[KeyGroup, ...]
    unrecognised: tuple[str, ...]


def split_ldm_state_dict(state: Mapping[str, object],
                         prefixes: Mapping[Component, str] = LDM_PREFIXES) -> LdmSplit:
    """ldm single-file state_dict -> per-component dicts (prefix removed), skipped and unrecognised keys.

    `prefixes`: each component's key prefix (`ldm_prefixes(recipe)`; the default is SD1's and SD2's).
    """
    components: dict[Component, StateDict] = {component: {} for component in prefixes}
    ema, ddpm, non_tensors, unrecognised = [], [], [], []
    for key, value in state.items():
        component = next((c for c, prefix in prefixes.items() if key.startswith(prefix)), None)
        if not isinstance(value, torch.Tensor):
            non_tensors.append(key)
        elif component is not None:
            components[component][key[len(prefixes[component]):]] = value
        elif key.startswith(EMA_PREFIX):
            ema.append(key)
        elif key in DDPM_BUFFERS:
            ddpm.append(key)
        else:
            unrecognised.append(key)
    skipped = [KeyGroup.of("EMA keys (model_ema.*)", ema), KeyGroup.of("DDPM schedule buffers", ddpm),
               KeyGroup.of("entries that are not tensors", non_tensors)]
    return LdmSplit(components, tuple(group for group in skipped if group.count), tuple(unrecognised))


def clip_text_normalized(state: StateDict) -> StateDict:
    """SD1 text keys as `transformer.text_model.…`, also when saved from a flattened CLIPTextModel."""
    hf = {key.removeprefix("transformer."): value for key, value in state.items() if key.startswith("transformer.")}
    other = {key: value for key, value in state.items() if not key.startswith("transformer.")}
    return other | diffusers_layout.clip_text_from_hf(hf)
