"""Checkpoint reading and writing, seeded random weights, and strict loading into our models.

Sources:
- an ldm single file: `.safetensors`, or a pickled `.ckpt` / `.pt` / `.pth` / `.bin` read by a restricted
  unpickler that rebuilds tensors and plain containers and never runs code named by the file;
- a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`), renamed by `diffusers_layout`;
- `RandomWeights(seed)`: every parameter drawn from a generator seeded by (seed, checkpoint key).

Loading is strict: every key our models hold must come from the source with the same shape, and every
key of the source must be used, except known extras (EMA copy, DDPM schedule buffers, non-tensor
entries), which are skipped and listed in the load report. Two kinds of keys may be absent and are
filled: the SD1 text encoder's constant `position_ids` buffer, and the OpenCLIP keys that never affect
SD2's output (the last block, `text_projection`, `logit_scale`; a diffusers SD2 folder has none of them).
"""
from __future__ import annotations

import _compat_pickle
import dataclasses
import enum
import hashlib
import io
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from sdcompile import diffusers_layout
from sdcompile.models.attention import AttentionImpl
from sdcompile.models.autoencoder import AutoencoderKL
from sdcompile.models.text_encoder import build_text_encoder
from sdcompile.models.unet import UNetModel
from sdcompile.recipes import Family, Recipe, TextEncoderKind, available_recipes, load_recipe
from sdrun.atomic import write_atomic
from sdrun.errors import UserError

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
# `DDPM.register_schedule` buffers (ldm/models/diffusion/ddpm.py); we recompute them from the recipe.
DDPM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights",
})
# Constant buffers our models compute themselves; a file may lack them or hold a damaged copy.
CONSTANT_BUFFERS = frozenset({"transformer.text_model.embeddings.position_ids"})
EXAMPLES_SHOWN = 5
CONTINUATION = "\n" + " " * len("  got:      ")  # aligns further lines under the first in UserError.message
NORM_JITTER_STD = 0.02  # random norm scales are 1 + N(0, 0.02²), biases N(0, 0.02²)
EMBEDDING_STD = 1.0  # random token/position embeddings are unit-variance, like a LayerNorm'ed stream


class Component(enum.Enum):
    UNET = "unet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"


LDM_PREFIXES = {
    Component.UNET: "model.diffusion_model.",
    Component.VAE: "first_stage_model.",
    Component.TEXT_ENCODER: "cond_stage_model.",
}
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    """Seeded random weights instead of a checkpoint: the same seed gives the same weights."""

    seed: int = 0


CheckpointSource = str | os.PathLike | RandomWeights


@dataclasses.dataclass(frozen=True)
class KeyGroup:
    """Keys that share a fate in loading (skipped or filled), with a few of them as examples."""

    reason: str
    count: int
    examples: tuple[str, ...]

    @classmethod
    def of(cls, reason: str, keys: Iterable[str]) -> KeyGroup:
        keys = sorted(keys)
        return cls(reason, len(keys), tuple(keys[:EXAMPLES_SHOWN]))

    def line(self, verb: str) -> str:
        more = ", …" if self.count > len(self.examples) else ""
        return f"{verb} {self.count} {self.reason}: {', '.join(self.examples)}{more}"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """Where the weights came from and what loading skipped or filled in."""

    source: str
    file_dtypes: tuple[str, ...] = ()
    skipped: tuple[KeyGroup, ...] = ()
    filled: tuple[KeyGroup, ...] = ()

    def lines(self) -> list[str]:
        head = self.source + (f" (stored as {', '.join(self.file_dtypes)})" if self.file_dtypes else "")
        return ([head] + [group.line("skipped") for group in self.skipped]
                + [group.line("filled") for group in self.filled])


@dataclasses.dataclass(frozen=True)
class StableDiffusionModels:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    report: LoadReport

    def component(self, component: Component) -> nn.Module:
        return getattr(self, component.value)


# --- loading ---------------------------------------------------------------------------------------------


def load_models(recipe: Recipe, source: CheckpointSource | None = None, dtype: torch.dtype = torch.float32,
                attention: AttentionImpl = AttentionImpl.SDPA) -> StableDiffusionModels:
    """The recipe's three models in eval mode with weights from `source` (None: `RandomWeights()`)."""
    source = RandomWeights() if source is None else source
    modules = build_models(recipe, attention)
    if isinstance(source, RandomWeights):
        for component, module in modules.items():
            randomize_parameters_(module, source.seed, LDM_PREFIXES[component])
        report = LoadReport(f"random weights (seed {source.seed})")
    else:
        states, report = read_checkpoint(Path(source), recipe)
        report = load_strict_(modules, states, recipe, report)
    for module in modules.values():
        module.to(dtype).eval().requires_grad_(False)
    return StableDiffusionModels(modules[Component.UNET], modules[Component.VAE],
                                 modules[Component.TEXT_ENCODER], report)


def build_models(recipe: Recipe, attention: AttentionImpl = AttentionImpl.SDPA) -> dict[Component, nn.Module]:
    return {
        Component.UNET: UNetModel(recipe.unet, attention),
        Component.VAE: AutoencoderKL(recipe.vae, attention),
        Component.TEXT_ENCODER: build_text_encoder(recipe.text_encoder, attention),
    }


@dataclasses.dataclass(frozen=True)
class CheckpointStates:
    """A checkpoint's tensors per component (our key layout, no prefix), plus keys of no component."""

    components: dict[Component, StateDict]
    unrecognised: tuple[str, ...] = ()


def load_strict_(modules: Mapping[Component, nn.Module], states: CheckpointStates, recipe: Recipe,
                 report: LoadReport) -> LoadReport:
    """Copy `states` into `modules` after checking keys and shapes; returns `report` plus what was filled."""
    filled: list[KeyGroup] = []
    ready = {}
    for component, module in modules.items():
        expected = module.state_dict()
        state, fills = with_filled_keys(component, states.components.get(component, {}), expected, recipe)
        ready[component] = state
        filled += [KeyGroup.of(f"{component.value} {reason}", keys) for reason, keys in fills.items() if keys]
    check_keys(modules, ready, states.unrecognised, recipe, report.source)
    for component, module in modules.items():
        module.load_state_dict(ready[component], strict=True)
    return dataclasses.replace(report, filled=tuple(filled))


def with_filled_keys(component: Component, state: StateDict, expected: Mapping[str, torch.Tensor],
                     recipe: Recipe) -> tuple[StateDict, dict[str, list[str]]]:
    """`state` with constant buffers taken from the model and absent unused OpenCLIP keys filled.

    Returns the state and, per reason, the keys filled in or replaced.
    """
    constants = {key: expected[key] for key in CONSTANT_BUFFERS if key in expected}
    fills = {
        "constant buffers absent from the source": [key for key in constants if key not in state],
        "constant buffers replaced by their computed values": [
            key for key in constants if key in state and not _same_values(state[key], constants[key])],
    }
    out = dict(state) | constants
    if component is Component.TEXT_ENCODER and recipe.text_encoder.kind is TextEncoderKind.OPENCLIP:
        shapes = {key: value.shape for key, value in expected.items()}
        unused = diffusers_layout.unused_openclip_fill(shapes, state, recipe.text_encoder)
        out |= unused
        fills["unused OpenCLIP keys absent from the source"] = list(unused)
    return out, fills


def _same_values(given: torch.Tensor, computed: torch.Tensor) -> bool:
    return given.shape == computed.shape and torch.equal(given.to(computed.dtype), computed)


# --- key checking ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyMismatch:
    component: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    misshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, expected, got)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def lines(self) -> list[str]:
        lines = []
        if self.missing:
            lines.append(f"{self.component}: {len(self.missing)} missing, e.g. {_examples(self.missing)}")
        if self.unexpected:
            lines.append(f"{self.component}: {len(self.unexpected)} unexpected, e.g. {_examples(self.unexpected)}")
        if self.misshaped:
            shown = "; ".join(f"{key} expected {list(want)} got {list(got)}"
                              for key, want, got in self.misshaped[:EXAMPLES_SHOWN])
            lines.append(f"{self.component}: {len(self.misshaped)} mis-shaped, e.g. {shown}")
        return lines


def key_mismatch(component: str, expected: Mapping[str, tuple[int, ...]],
                 given: Mapping[str, tuple[int, ...]]) -> KeyMismatch:
    common = sorted(expected.keys() & given.keys())
    return KeyMismatch(
        component,
        missing=tuple(sorted(expected.keys() - given.keys())),
        unexpected=tuple(sorted(given.keys() - expected.keys())),
        misshaped=tuple((k, expected[k], given[k]) for k in common if expected[k] != given[k]),
    )


def check_keys(modules: Mapping[Component, nn.Module], states: Mapping[Component, StateDict],
               unrecognised: tuple[str, ...], recipe: Recipe, source: str) -> None:
    """Raise a UserError listing missing, unexpected and mis-shaped keys, with a hint at the cause."""
    mismatches = [key_mismatch(c.value, _shapes(m.state_dict()), _shapes(states[c])) for c, m in modules.items()]
    mismatches.append(KeyMismatch("outside unet/vae/text encoder", (), tuple(sorted(unrecognised)), ()))
    mismatches = [m for m in mismatches if m]
    if not mismatches:
        return
    counts = [sum(len(getattr(m, field)) for m in mismatches) for field in ("missing", "unexpected", "misshaped")]
    hints = family_hints(states, unrecognised, recipe)
    raise UserError(
        f"{source} does not fit recipe '{recipe.name}': {counts[0]} missing, {counts[1]} unexpected and "
        f"{counts[2]} mis-shaped keys.",
        expected=f"the keys and shapes of recipe '{recipe.name}' ({recipe.description})",
        got=CONTINUATION.join(line for m in mismatches for line in m.lines()),
        fix="; ".join(hints + ["choose the recipe that describes this checkpoint (`sdcompile recipes`)"]))


def family_hints(states: Mapping[Component, StateDict], unrecognised: Iterable[str], recipe: Recipe) -> list[str]:
    """Signs that a checkpoint belongs to another model family than the recipe's."""
    unet = states.get(Component.UNET, {})
    text = states.get(Component.TEXT_ENCODER, {})
    hints = [
        _text_layout_hint(text, recipe),
        _context_width_hint(unet, recipe),
        _projection_hint(unet, recipe),
        _in_channels_hint(unet, recipe),
        _foreign_layout_hint(unrecognised),
    ]
    return [hint for hint in hints if hint]


def _text_layout_hint(text: StateDict, recipe: Recipe) -> str | None:
    if recipe.text_encoder.kind is TextEncoderKind.OPENCLIP and any(k.startswith("transformer.") for k in text):
        return ("the text encoder is CLIP in Hugging Face layout (`cond_stage_model.transformer.`, SD 1.x) but "
                f"the recipe expects OpenCLIP (`cond_stage_model.model.`): try {_recipes_of(Family.SD1)}")
    if recipe.text_encoder.kind is TextEncoderKind.CLIP and any(k.startswith("model.") for k in text):
        return ("the text encoder is OpenCLIP (`cond_stage_model.model.`, SD 2.x) but the recipe expects CLIP "
                f"(`cond_stage_model.transformer.`): try {_recipes_of(Family.SD2)}")
    return None


def _context_width_hint(unet: StateDict, recipe: Recipe) -> str | None:
    widths = {v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight") and v.ndim == 2}
    if not widths or widths == {recipe.unet.context_dim}:
        return None
    return (f"the UNet cross-attends to context width {sorted(widths)[0]} (768: SD 1.x, 1024: SD 2.x) but the "
            f"recipe's context_dim is {recipe.unet.context_dim}")


def _projection_hint(unet: StateDict, recipe: Recipe) -> str | None:
    ranks = {v.ndim for k, v in unet.items() if k.endswith("proj_in.weight")}
    linear = recipe.unet.use_linear_in_transformer
    if ranks == {2} and not linear:
        return "the UNet's transformer projections are linear (SD 2.x) but the recipe expects 1×1 convolutions"
    if ranks == {4} and linear:
        return "the UNet's transformer projections are 1×1 convolutions (SD 1.x) but the recipe expects linear ones"
    return None


def _in_channels_hint(unet: StateDict, recipe: Recipe) -> str | None:
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4 or conv_in.shape[1] == recipe.unet.in_channels:
        return None
    kind = " (9: an inpainting model)" if conv_in.shape[1] == 9 else ""
    return f"the UNet takes {conv_in.shape[1]} input channels{kind}; the recipe has {recipe.unet.in_channels}"


def _foreign_layout_hint(unrecognised: Iterable[str]) -> str | None:
    keys = list(unrecognised)
    if any(k.startswith("conditioner.") for k in keys):
        return "keys under `conditioner.` belong to SDXL, which no recipe describes yet"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")) for k in keys):
        return ("this file holds one component in diffusers layout: pass the pipeline folder (with unet/, vae/, "
                "text_encoder/) instead")
    return None


def _recipes_of(family: Family) -> str:
    names = [name for name in available_recipes() if load_recipe(name).family is family]
    return f"a {family.value} recipe ({', '.join(names)})" if names else f"a {family.value} recipe"


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _examples(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:EXAMPLES_SHOWN]) + (", …" if len(keys) > EXAMPLES_SHOWN else "")


# --- reading checkpoints ---------------------------------------------------------------------------------


def read_checkpoint(path: Path, recipe: Recipe) -> tuple[CheckpointStates, LoadReport]:
    """Per-component tensors (our key layout) from an ldm file or a diffusers folder, and what was skipped."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist.",
                        expected="a .safetensors or .ckpt file, or a diffusers folder with unet/, vae/, text_encoder/",
                        got=str(path), fix="check the path")
    if path.is_dir():
        return read_diffusers_folder(path, recipe)
    split = split_ldm_state_dict(read_raw_state_dict(path))
    components = dict(split.components)
    if recipe.text_encoder.kind is TextEncoderKind.CLIP:
        components[Component.TEXT_ENCODER] = clip_text_normalized(components.get(Component.TEXT_ENCODER, {}))
    report = LoadReport(f"ldm checkpoint {path}", _float_dtypes(components.values()), split.skipped)
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
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable .safetensors file: {err}.",
                        expected="a complete safetensors file (8-byte header length, JSON header, tensor data)",
                        got=f"{path.stat().st_size} bytes",
                        fix="download or copy the file again (it may be truncated)") from None


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


def split_ldm_state_dict(state: Mapping[str, object]) -> LdmSplit:
    """ldm single-file state_dict -> per-component dicts (prefix removed), skipped and unrecognised keys."""
    components: dict[Component, StateDict] = {component: {} for component in Component}
    ema, ddpm, non_tensors, unrecognised = [], [], [], []
    for key, value in state.items():
        component = next((c for c, prefix in LDM_PREFIXES.items() if key.startswith(prefix)), None)
        if not isinstance(value, torch.Tensor):
            non_tensors.append(key)
        elif component is not None:
            components[component][key[len(LDM_PREFIXES[component]):]] = value
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


def _float_dtypes(states: Iterable[StateDict]) -> tuple[str, ...]:
    dtypes = {str(v.dtype).removeprefix("torch.") for s in states for v in s.values() if v.is_floating_point()}
    return tuple(sorted(dtypes))


# --- diffusers folders -----------------------------------------------------------------------------------


def read_diffusers_folder(folder: Path, recipe: Recipe) -> tuple[CheckpointStates, LoadReport]:
    """unet/, vae/, text_encoder/ of a diffusers pipeline folder, renamed to our layout."""
    subfolders = {component: folder / component.value for component in Component}
    absent = [f"{path.name}/" for path in subfolders.values() if not path.is_dir()]
    if absent:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise UserError(f"{folder} is a directory but not a diffusers pipeline folder.",
                        expected="subfolders unet/, vae/ and text_encoder/, each with config.json and weights",
                        got=f"missing {', '.join(absent)}; found {', '.join(found[:10]) or 'nothing'}",
                        fix="pass the folder holding model_index.json, or a single .safetensors/.ckpt file")
    raw = {component: read_diffusers_component(path) for component, path in subfolders.items()}
    components = {
        Component.UNET: diffusers_layout.unet_from_diffusers(raw[Component.UNET], recipe.unet),
        Component.VAE: diffusers_layout.vae_from_diffusers(raw[Component.VAE], recipe.vae),
        Component.TEXT_ENCODER: diffusers_layout.text_from_hf(raw[Component.TEXT_ENCODER], recipe.text_encoder),
    }
    return CheckpointStates(components), LoadReport(f"diffusers folder {folder}", _float_dtypes(raw.values()))


def read_diffusers_component(subfolder: Path) -> StateDict:
    """The weights of one diffusers/transformers `save_pretrained` folder (single file or shards)."""
    for name in DIFFUSERS_WEIGHT_FILES:
        index = subfolder / f"{name}.index.json"
        if (subfolder / name).is_file():
            return read_state_dict_file(subfolder / name)
        if index.is_file():
            return _read_shards(index)
    raise UserError(f"{subfolder} holds no weights file.",
                    expected=" or ".join(DIFFUSERS_WEIGHT_FILES[:2]) + " (or a .bin / sharded equivalent)",
                    got=", ".join(sorted(p.name for p in subfolder.iterdir())) or "an empty folder",
                    fix="save the component with save_pretrained, or download it again")


def _read_shards(index: Path) -> StateDict:
    try:
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise UserError(f"{index} is not a valid shard index: {err}.", expected='JSON with a "weight_map" table',
                        fix="download the folder again") from None
    state: StateDict = {}
    for name in shard_names:
        state |= read_state_dict_file(index.parent / Path(name).name)
    return state


# --- restricted unpickling -------------------------------------------------------------------------------


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


class InertStandIn:
    """Stands in for a class or function that training code stored in a checkpoint (Lightning callbacks,
    OmegaConf configs, numpy scalars): accepts any construction and keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


# Roots of modules whose globals become `InertStandIn`; nothing from them is imported or called.
INERT_MODULE_ROOTS = frozenset({"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing"})
INERT_GLOBALS = frozenset({
    ("argparse", "Namespace"), ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "defaultdict"), ("collections", "deque"),
})
TORCH_DTYPES = {
    name: getattr(torch, name) for name in (
        "float16", "float32", "float64", "bfloat16", "half", "float", "double",
        "int8", "int16", "int32", "int64", "uint8", "bool", "short", "int", "long")
}
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    """(storage, offset, size, stride, [requires_grad, hooks, metadata]) -> a view; bounds are checked."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_tensor_v3(storage: torch.Tensor, offset: int, size, stride, requires_grad, hooks,
                       dtype: torch.dtype, *_ignored) -> torch.Tensor:
    return _rebuild_tensor(storage.view(dtype) if storage.dtype != dtype else storage, offset, size, stride)


def _rebuild_parameter(data: torch.Tensor, *_ignored) -> torch.Tensor:
    return data


def _encoded(text: str, encoding: str = "utf-8") -> bytes:
    """Pickle protocol 2 stores bytes as `_codecs.encode(text, "latin1")`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"unsupported bytes encoding {encoding!r:.40}")
    return text.encode(encoding)


SAFE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _encoded,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Pickle protocol 2 (torch.save's) writes Python 2 names (`__builtin__`, `commands`); map them back
    as `pickle.Unpickler.find_class` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


def resolve_global(module: str, name: str) -> object:
    """What a pickle's GLOBAL `module.name` becomes: a tensor rebuilder, a plain type, an inert stand-in,
    or a refusal. Nothing named by the file is imported."""
    if (module, name) in SAFE_GLOBALS:
        return SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
        return TORCH_DTYPES[name]
    if module.split(".")[0] in INERT_MODULE_ROOTS or (module, name) in INERT_GLOBALS:
        return InertStandIn
    raise RefusedGlobal(module, name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, read_storage: Callable[[str, torch.dtype, int], torch.Tensor]):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage

    def find_class(self, module: str, name: str) -> object:
        return resolve_global(*python3_name(module, name))

    def persistent_load(self, pid) -> torch.Tensor:
        """('storage', storage type, record key, location, element count) -> a 1-D tensor of that storage."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return self._read_storage(str(pid[2]), pid[1].dtype, pid[4])


def read_pickled(path: Path) -> object:
    """The object a `torch.save` zip archive holds, rebuilt without running code from the file."""
    with open(path, "rb") as file:
        magic = file.read(len(ZIP_MAGIC))
    if magic != ZIP_MAGIC:
        got = "the legacy (pre-1.6) torch format" if magic[:1] == PICKLE_PROTO else f"a file starting with {magic!r}"
        raise UserError(f"{path} is not a torch zip archive.",
                        expected="a checkpoint written by torch.save (PyTorch >= 1.6 zip format)", got=got,
                        fix="convert it to .safetensors in an environment you trust, or download a .safetensors copy")
    try:
        with zipfile.ZipFile(path) as archive:
            return _unpickle_archive(archive)
    except RefusedGlobal as refused:
        raise UserError(f"{path} names `{refused.qualified_name}`, which loading would have to import or call; "
                        "refused (checkpoints are read without running code from them).",
                        expected="tensors, plain containers and training records (Lightning, OmegaConf, numpy)",
                        got=f"pickle global {refused.qualified_name}",
                        fix="use a .safetensors copy of this checkpoint; only if you trust its author, convert it "
                            "with torch.load(weights_only=False) and safetensors.torch.save_file") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path} is damaged or not a model checkpoint: {type(err).__name__}: {err}.",
                        expected="a torch.save archive holding a state_dict",
                        fix="download or copy the file again") from None


def _unpickle_archive(archive: zipfile.ZipFile) -> object:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f"expected one <archive>/data.pkl record, found {len(pickles)}")
    root = pickles[0][: -len("data.pkl")]
    byteorder = _record_text(archive, root + "byteorder") or "little"
    if byteorder != "little":
        raise pickle.UnpicklingError(f"byte order {byteorder!r} is not supported")
    storages: dict[str, torch.Tensor] = {}

    def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in storages:
            storages[key] = _read_storage_record(archive, f"{root}data/{key}", dtype, numel)
        return storages[key]

    with archive.open(pickles[0]) as data:
        return _RestrictedUnpickler(io.BytesIO(data.read()), read_storage).load()


def _record_text(archive: zipfile.ZipFile, name: str) -> str | None:
    try:
        return archive.read(name).decode().strip()
    except KeyError:
        return None


def _read_storage_record(archive: zipfile.ZipFile, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The raw bytes of one storage record as a 1-D tensor of `numel` elements of `dtype`."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    data = bytearray(archive.read(name))
    if len(data) < nbytes:
        raise pickle.UnpicklingError(f"record {name} has {len(data)} bytes, {nbytes} expected")
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8, count=nbytes).view(dtype)


# --- seeded random weights -------------------------------------------------------------------------------


def randomize_parameters_(module: nn.Module, seed: int, namespace: str = "") -> nn.Module:
    """Overwrite every parameter with `random_tensor(namespace + name, …)`; buffers keep their values."""
    with torch.no_grad():
        for owner_name, owner in module.named_modules():
            for leaf, parameter in owner.named_parameters(recurse=False):
                name = f"{namespace}{owner_name}.{leaf}" if owner_name else namespace + leaf
                embedding = isinstance(owner, nn.Embedding) or leaf.endswith("embedding")
                parameter.copy_(random_tensor(name, parameter.shape, seed, embedding))
    return module


def random_tensor(name: str, shape: torch.Size | tuple[int, ...], seed: int, embedding: bool = False) -> torch.Tensor:
    """fp32 values for parameter `name`, a function of (seed, name, shape, embedding) alone.

    Embedding tables: N(0, 1); other matrices and kernels: N(0, 1/fan_in), so each layer keeps
    unit-scale activations (LeCun init); 1-D weights (norm scales): 1 + N(0, 0.02²); biases and scalars:
    N(0, 0.02²). No tensor is zero, unlike the original zero-initialised output convolutions.
    """
    generator = torch.Generator().manual_seed(_seed_for(name, seed))
    noise = torch.randn(tuple(shape), generator=generator)
    if len(shape) >= 2:
        return noise.mul_(EMBEDDING_STD if embedding else math.prod(shape[1:]) ** -0.5)
    if len(shape) == 1 and name.endswith("weight"):
        return noise.mul_(NORM_JITTER_STD).add_(1.0)
    return noise.mul_(NORM_JITTER_STD)


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --- writing ---------------------------------------------------------------------------------------------


def ldm_state_dict(models: StableDiffusionModels) -> StateDict:
    """All weights under their ldm single-file keys (`model.diffusion_model.…`, …)."""
    return {
        LDM_PREFIXES[component] + key: value.detach().contiguous()
        for component in Component
        for key, value in models.component(component).state_dict().items()
    }


def save_ldm_checkpoint(models: StableDiffusionModels, path: str | os.PathLike) -> Path:
    """Write an ldm single file: `.safetensors`, or `.ckpt` / `.pt` / `.pth` as torch.save({"state_dict": …}).

    Written to a temporary name first and renamed, so a failed write leaves no partial checkpoint.
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"cannot write a checkpoint named {path.name}.",
                        expected=f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}", got=path.suffix or "no suffix",
                        fix="name the output file with one of those suffixes")
    state = ldm_state_dict(models)
    if path.suffix == ".safetensors":
        write_atomic(path, lambda temp: safetensors.torch.save_file(state, str(temp), metadata={"format": "pt"}))
    else:
        write_atomic(path, lambda temp: torch.save({"state_dict": state}, temp))
    return path
