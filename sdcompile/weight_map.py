"""Which checkpoint tensor each ONNX initializer holds: the map LoRA merging and TensorRT refit follow.

An initializer of a bundle's graph is a checkpoint tensor (its ldm single-file key), as it is or
transposed (the exporter folds `Transpose(W)` of a linear layer into a new constant), in the graph's
dtype (the fp16 pass writes `<name>_fp16` copies). The traced graph is matched while the eager
model is alive: by name where the exporter kept the parameter's name, by content for the folded
transposes. The final graph's names are then traced back through the passes' renames. Written per
component as `weight_map.json`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from sdcompile.graph.external import load_structure
from sdrun.external_data import read_external
from sdrun.atomic import write_atomic
from sdrun.bundle import WEIGHT_MAP_NAME

FILE_NAME = WEIGHT_MAP_NAME
FORMAT = "sdcompile-weight-map"
_PASS_SUFFIX = re.compile(r"_(fp16|fp32)(_\d+)?$")  # names the fp16 pass gives converted copies
_PROBE_ELEMENTS = 16  # leading elements compared before a whole tensor is


@dataclasses.dataclass(frozen=True)
class WeightSource:
    checkpoint: str  # the tensor's key in the ldm single-file layout
    transform: str  # "identity" | "transpose" (of a 2-D weight), applied before casting to the graph's dtype


def traced_sources(wrapper: torch.nn.Module, model: torch.nn.Module, prefix: str,
                   traced: Path) -> dict[str, WeightSource]:
    """Initializer name -> source for the graph traced from `wrapper` (which holds `model`, whose keys take
    the checkpoint `prefix`), its data external beside `traced`."""
    keys = {id(t): prefix + k for k, t in (*model.named_parameters(), *model.named_buffers())}
    by_name = {n: keys[id(t)] for n, t in (*wrapper.named_parameters(), *wrapper.named_buffers()) if id(t) in keys}
    structure = load_structure(traced)
    sources = {t.name: WeightSource(by_name[t.name], "identity") for t in structure.graph.initializer
               if t.name in by_name}
    named = {s.checkpoint for s in sources.values()}
    candidates: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name, tensor in wrapper.named_parameters():
        key = by_name.get(name)
        if key and key not in named and tensor.dim() == 2:
            candidates.setdefault(tuple(tensor.shape[::-1]), []).append((key, tensor.detach().t().numpy()))
    for initializer in structure.graph.initializer:
        if initializer.name not in sources and len(initializer.dims) == 2:
            key = _transposed_match(initializer, candidates.get(tuple(initializer.dims), []), traced.parent)
            if key:
                sources[initializer.name] = WeightSource(key, "transpose")
    return sources


def _transposed_match(initializer: onnx.TensorProto, candidates: list, directory: Path) -> str | None:
    """The candidate whose transpose is bit for bit the initializer (removed from `candidates`)."""
    data = None
    for index, (key, transposed) in enumerate(candidates):
        if data is None:
            data = np.frombuffer(_raw(initializer, directory), helper.tensor_dtype_to_np_dtype(initializer.data_type))
        if data.dtype == transposed.dtype and np.array_equal(data[:_PROBE_ELEMENTS],
                                                              transposed.reshape(-1)[:_PROBE_ELEMENTS]):
            if np.array_equal(data, transposed.reshape(-1)):
                del candidates[index]
                return key
    return None


def _raw(tensor: onnx.TensorProto, directory: Path) -> bytes:
    if tensor.external_data:
        return read_external(tensor, directory)
    return tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()


def final_map(model: onnx.ModelProto, sources: dict[str, WeightSource]) -> dict:
    """The map of a finished graph: each initializer traced back through the passes' renames."""
    initializers, unmapped = {}, []
    for tensor in model.graph.initializer:
        source = _source_of(tensor.name, sources)
        if source is not None:
            initializers[tensor.name] = {**dataclasses.asdict(source),
                                         "dtype": helper.tensor_dtype_to_np_dtype(tensor.data_type).name}
        elif len(tensor.dims) >= 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            unmapped.append(tensor.name)
    return {"format": FORMAT, "version": 1, "initializers": initializers, "unmapped": sorted(unmapped)}


def _source_of(name: str, sources: dict[str, WeightSource]) -> WeightSource | None:
    while name not in sources:
        base = _PASS_SUFFIX.sub("", name)
        if base == name:
            return None
        name = base
    return sources[name]


def write_weight_map(weight_map: dict, path: Path) -> Path:
    write_atomic(path, lambda temp: Path(temp).write_text(json.dumps(weight_map, indent=1, sort_keys=True)))
    return Path(path)
