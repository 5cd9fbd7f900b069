"""LoRAs swapped into a plain bundle at load time: for every weight a LoRA changes, the graph initializers
that hold it (the component's `weight_map.json`) get W + transform(ΔW) in their own dtype.

Only those initializers are read: the graph is parsed without its external data, and each affected
tensor's bytes are read from the graph or from its data file (ONNX external data: `location`, `offset`,
`length` relative to the graph's directory).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdrun.bundle import WEIGHT_MAP_NAME as WEIGHT_MAP
from sdrun.bundle import Bundle
from sdrun.diffusers_names import ldm_prefixes
from sdrun.errors import UserError
from sdrun.external_data import read_external
from sdrun.lora.delta import lora_deltas
from sdrun.lora.file import LoraFile, read_lora
from sdrun.lora.names import check_models_exist
from sdrun.lora.request import LoraRequest, lora_record
from sdrun.recipe import Recipe

Overrides = dict[str, dict[str, np.ndarray]]  # component -> initializer name -> replacement value


def lora_overrides(bundle: Bundle, components: Sequence[str],
                   requests: Sequence[LoraRequest]) -> tuple[Overrides, list[dict]]:
    """The initializers `requests` change in each of `components`, and per LoRA its record."""
    files = [read_lora(request.path) for request in requests]
    for lora in files:
        check_models_exist((model for model, _ in lora.modules), bundle.recipe, lora.path)
    loras = [(lora, request.scale) for lora, request in zip(files, requests)]
    adapted = {model for lora in files for model, _ in lora.modules}
    touched: list[dict[str, int]] = [{} for _ in requests]
    overrides: Overrides = {}
    for name in components:
        weight_map = _weight_map(bundle, name)
        model = _model_of(weight_map, bundle.recipe)
        if model not in adapted:
            continue
        overrides[name], counts = _component_overrides(bundle.graph_path(name), weight_map, model, loras,
                                                        bundle.recipe)
        for record, count in zip(touched, counts):
            record[model] = max(record.get(model, 0), count)
    for lora, record in zip(files, touched):
        _check_all_models_loaded(lora, record)
    return overrides, [lora_record(r, f.sha256, t) for r, f, t in zip(requests, files, touched)]


def _weight_map(bundle: Bundle, component: str) -> dict[str, dict]:
    path = bundle.graph_path(component).parent / WEIGHT_MAP
    if not path.is_file():
        raise UserError(f"the {component} graph of {bundle.root} has no {WEIGHT_MAP}, so LoRAs cannot be swapped in.",
                        fix=f"re-export the bundle with this sdcompile: {bundle.rebuild_hint(component)}")
    return json.loads(path.read_text())["initializers"]


def _model_of(weight_map: dict[str, dict], recipe: Recipe) -> str | None:
    """The model whose weights the graph holds, by the ldm key prefix of its checkpoint tensors."""
    keys = [entry["checkpoint"] for entry in weight_map.values()]
    for model, prefix in ldm_prefixes(recipe).items():
        if keys and all(key.startswith(prefix) for key in keys):
            return model
    return None


def _component_overrides(graph: Path, weight_map: dict[str, dict], model: str, loras: list[tuple[LoraFile, float]],
                         recipe: Recipe) -> tuple[dict[str, np.ndarray], list[int]]:
    import onnx

    structure = onnx.load(str(graph), load_external_data=False)
    initializers = {t.name: t for t in structure.graph.initializer if t.name in weight_map}
    shapes = {}
    for name, entry in weight_map.items():
        dims = tuple(initializers[name].dims)
        shapes[entry["checkpoint"]] = dims[::-1] if entry["transform"] == "transpose" else dims
    deltas, touched = lora_deltas(loras, model, shapes, recipe)
    holders: dict[str, list[str]] = {}  # checkpoint key -> the initializers holding it
    for name, entry in weight_map.items():
        holders.setdefault(entry["checkpoint"], []).append(name)
    values = {}
    for key, delta in deltas:
        for name in holders[key]:
            base = _initializer_array(initializers[name], graph.parent)
            moved = delta.T if weight_map[name]["transform"] == "transpose" else delta
            values[name] = (base.astype(np.float32) + moved).astype(base.dtype)
    return values, touched


def _initializer_array(tensor, directory: Path) -> np.ndarray:
    """One initializer's value, read from the graph or from its external-data file."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    raw = read_external(tensor, directory)
    return np.frombuffer(raw, helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))


def _check_all_models_loaded(lora: LoraFile, touched: dict[str, int]) -> None:
    missing = sorted({model for model, _ in lora.modules} - set(touched))
    if missing:
        raise UserError(f"LoRA {lora.path.name} adapts {', '.join(missing)}, and no graph of this bundle holds "
                        "that model's weights.", fix="use a LoRA made for this model family")
