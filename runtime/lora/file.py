"""Reading a LoRA `.safetensors` file into (model, module) -> (down, up, alpha), in either published layout.

kohya / web UIs: `lora_unet_<module>.lora_down.weight`, `….lora_up.weight`, `….alpha` (0-dim), where
<module> is the diffusers / transformers module path with dots replaced by underscores, and the text
encoder's prefix is `lora_te_` (`lora_te1_` / `lora_te2_` for SDXL's two).
diffusers / PEFT: `unet.<module>.lora_A.weight` (down), `….lora_B.weight` (up), or the older
`….lora.down.weight` / `….lora.up.weight`; `text_encoder.` / `text_encoder_2.` for the text encoders.
diffusers stores no per-module alpha: PEFT's `lora_alpha` is in the `lora_adapter_metadata` JSON of
the file's metadata (per model), and alpha = rank when that is absent.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sdrun.bundle import sha256_file
from sdrun.errors import UserError
from sdrun.safetensors_extent import (HEADER_LENGTH_BYTES, METADATA_KEY, check_safetensors_extent, read_header,
                                      tensor_extents)

# name prefix -> (model, layout); the model names are the ldm layout's (`sdrun.diffusers_names.LDM_PREFIXES`).
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# key suffix -> role, per layout
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up"}
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' metadata key: {model: PEFT LoraConfig as a dict}
EXAMPLES = 3  # keys quoted in an error
FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}  # safetensors dtype -> numpy, besides BF16


@dataclasses.dataclass(frozen=True)
class LoraPair:
    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: alpha = rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    layout: str  # "kohya" | "diffusers"
    modules: dict[tuple[str, str], LoraPair]  # (model, module name as the file spells it) -> pair


PICKLED_SUFFIXES = (".pt", ".ckpt", ".bin")  # torch.save archives: read by the compiler's restricted unpickler


def read_lora(path: Path) -> LoraFile:
    """The LoRA `.safetensors` at `path`, checked: complete file, known keys, a down and an up per module,
    finite values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist.", fix="pass the path of a .safetensors LoRA file")
    return lora_from_tensors(path, *_read_tensors(path))


def lora_from_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> LoraFile:
    """The LoRA that `tensors` (key -> float array, as read from `path`) and the file's metadata describe."""
    layout = _layout(path, tensors)
    roles = _grouped(path, tensors, layout)
    alphas = _metadata_alphas(metadata) if layout == "diffusers" else {}
    modules = {module: _pair(path, module, parts, alphas.get(module[0])) for module, parts in roles.items()}
    return LoraFile(path, sha256_file(path), layout, modules)


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    import safetensors
    import safetensors.numpy

    if path.suffix in PICKLED_SUFFIXES:
        raise UserError(f"cannot read LoRA {path.name} at run time: {path.suffix} files are torch pickles, which "
                        "the runtime does not read.", fix=f"merge it at export (sdcompile export --lora {path}), "
                        "or convert it to .safetensors")
    if path.suffix != ".safetensors":
        raise UserError(f"cannot read LoRA {path.name}: only .safetensors LoRA files are read "
                        f"({', '.join(PICKLED_SUFFIXES)} at export).",
                        got=path.suffix or "no suffix", fix="convert the LoRA to .safetensors")
    check_safetensors_extent(path)
    length, header = read_header(path, path.stat().st_size)
    metadata = header.get(METADATA_KEY) or {}
    extents = tensor_extents(path, header)
    if any(extent.dtype == "BF16" for extent in extents):
        return _widened_tensors(path, HEADER_LENGTH_BYTES + length, extents), metadata
    try:
        return safetensors.numpy.load_file(str(path)), metadata
    except (safetensors.SafetensorError, TypeError, ValueError) as err:
        raise UserError(f"cannot read LoRA {path} ({err}).", expected="float16, bfloat16 or float32 tensors",
                        fix="save the LoRA with floating-point weights") from None


def _widened_tensors(path: Path, data_start: int, extents) -> dict[str, np.ndarray]:
    """Every tensor of a file holding bfloat16 ones, those widened to float32 (numpy has no bfloat16; its bits
    are the upper half of a float32's)."""
    tensors = {}
    with open(path, "rb") as file:
        for extent in extents:
            if extent.dtype != "BF16" and extent.dtype not in FLOAT_DTYPES:
                raise UserError(f"LoRA {path.name}: tensor {extent.name} is {extent.dtype}.",
                                expected="float16, bfloat16 or float32 tensors", fix="pass an intact LoRA file")
            file.seek(data_start + extent.begin)
            raw = file.read(extent.end - extent.begin)
            if extent.dtype == "BF16":
                value = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
            else:
                value = np.frombuffer(raw, FLOAT_DTYPES[extent.dtype])
            tensors[extent.name] = value.reshape(extent.shape)
    return tensors


def _layout(path: Path, tensors: dict) -> str:
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in tensors):
        return "kohya"
    if any(key.startswith(tuple(DIFFUSERS_PREFIXES)) for key in tensors):
        return "diffusers"
    raise UserError(f"{path} is not a LoRA in a layout we read.",
                    expected=f"keys starting with {', '.join((*KOHYA_PREFIXES, *DIFFUSERS_PREFIXES))}",
                    got=f"{len(tensors)} keys such as {', '.join(list(tensors)[:EXAMPLES]) or 'none'}",
                    fix="pass a kohya/web-UI or diffusers/PEFT LoRA")


def _grouped(path: Path, tensors: dict, layout: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(model, module) -> {"down"|"up"|"alpha": tensor}; a key of no known prefix and suffix is refused."""
    prefixes, suffixes = (KOHYA_PREFIXES, KOHYA_SUFFIXES) if layout == "kohya" else (DIFFUSERS_PREFIXES,
                                                                                     DIFFUSERS_SUFFIXES)
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if prefix is None or suffix is None:
            unknown.append(key)
            continue
        module = (prefixes[prefix], key[len(prefix):-len(suffix)])
        grouped.setdefault(module, {})[suffixes[suffix]] = value
    if unknown:
        raise UserError(f"{path} has {len(unknown)} keys that are not {layout} LoRA weights (LoHa, LoKr, full "
                        "diffs and other adapter kinds are not read).",
                        expected=f"<prefix><module>{{{', '.join(suffixes)}}}",
                        got=", ".join(unknown[:EXAMPLES]), fix="pass a plain LoRA / LoCon file")
    return grouped


def _metadata_alphas(metadata: dict) -> dict[str, float]:
    """model -> PEFT `lora_alpha` from diffusers' adapter metadata (absent: none)."""
    try:
        configs = json.loads(metadata.get(ADAPTER_METADATA, "{}"))
        return {model: float(config["lora_alpha"]) for model, config in configs.items() if "lora_alpha" in config}
    except (ValueError, TypeError, AttributeError, KeyError):
        return {}


def _pair(path: Path, module: tuple[str, str], parts: dict[str, np.ndarray], alpha: float | None) -> LoraPair:
    name = f"{module[0]}:{module[1]}"
    if "down" not in parts or "up" not in parts:
        missing = "down" if "down" not in parts else "up"
        raise UserError(f"LoRA {path.name}: module {name} has no {missing} weight.",
                        fix="pass a complete LoRA file")
    for role, value in parts.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise UserError(f"LoRA {path.name}: the {role} tensor of module {name} holds NaN, inf or non-float "
                            "values.", got=f"{value.dtype} {list(value.shape)}",
                            fix="the LoRA is damaged or was trained into divergence; use another file")
    down, up = parts["down"], parts["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or up.shape[2:] not in (
            (), (1, 1)):
        raise UserError(f"LoRA {path.name}: module {name} has down and up weights that do not compose.",
                        expected="down (rank, in[, kh, kw]) and up (out, rank[, 1, 1])",
                        got=f"down {list(down.shape)}, up {list(up.shape)}", fix="pass an intact LoRA file")
    if "alpha" in parts:
        alpha = float(parts["alpha"])
    return LoraPair(down.astype(np.float32), up.astype(np.float32), alpha)
