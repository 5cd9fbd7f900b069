"""Weight deltas of LoRAs on one model: ΔW = scale · (alpha / rank) · up @ down, summed over LoRAs."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from sdrun.errors import UserError
from sdrun.lora.file import EXAMPLES, LoraFile, LoraPair
from sdrun.lora.names import Target, check_models_exist, kohya_table, module_table
from sdrun.recipe import Recipe


def weight_delta(pair: LoraPair, scale: float) -> np.ndarray:
    """(out, in·kh·kw) float32: up (out, rank[, 1, 1]) @ down (rank, in[, kh, kw]) · scale · alpha / rank."""
    rank = pair.rank
    alpha = rank if pair.alpha is None else pair.alpha
    up = pair.up.reshape(pair.up.shape[0], rank)
    return (up @ pair.down.reshape(rank, -1)) * np.float32(scale * alpha / rank)


def placed_delta(pair: LoraPair, scale: float, target: Target, shape: tuple[int, ...]) -> np.ndarray:
    """ΔW of `pair` in the shape of `target`'s weight: the whole weight, or its row block with zeros elsewhere."""
    delta = weight_delta(pair, scale)  # (out, in·kh·kw)
    if target.blocks == 1:
        return delta.reshape(shape)
    placed = np.zeros((shape[0], math.prod(shape[1:])), np.float32)  # (blocks·out, in·kh·kw)
    rows = shape[0] // target.blocks
    placed[target.block * rows:(target.block + 1) * rows] = delta
    return placed.reshape(shape)


def resolved_modules(lora: LoraFile, model: str, ldm_keys: Sequence[str], recipe: Recipe) -> dict[Target, LoraPair]:
    """Target -> pair, for the modules of `lora` on `model`; a module matching no weight is refused."""
    check_models_exist((owner for owner, _ in lora.modules), recipe, lora.path)
    names = {name: pair for (owner, name), pair in lora.modules.items() if owner == model}
    if not names:
        return {}
    table = module_table(model, ldm_keys, recipe)
    if lora.layout == "kohya":
        table = kohya_table(table)
    matched = {name: table.get(name) for name in names}
    unmatched = [name for name, key in matched.items() if key is None]
    if unmatched:
        raise _unmatched_error(lora, model, recipe, len(names) - len(unmatched), unmatched, table)
    return {matched[name]: pair for name, pair in names.items() if not matched[name].unused}


def _unmatched_error(lora: LoraFile, model: str, recipe: Recipe, matched: int, unmatched: list[str],
                     table: Mapping[str, Target | None]) -> UserError:
    return UserError(
        f"LoRA {lora.path.name}: {len(unmatched)} of its {matched + len(unmatched)} {model} modules match no "
        f"weight of the {recipe.name} {model} ({matched} match): was it made for another model or architecture?",
        expected=f"names of the {len(table)} {model} weights, such as {', '.join(sorted(table)[:EXAMPLES])}",
        got=", ".join(unmatched[:EXAMPLES]), fix=f"use a LoRA trained for {recipe.name}'s architecture")


def fitted_modules(lora: LoraFile, model: str, shapes: Mapping[str, tuple[int, ...]],
                   recipe: Recipe) -> dict[Target, LoraPair]:
    """Target -> pair of `lora` on `model` (weights of `shapes`), each checked to fit its weight."""
    modules = resolved_modules(lora, model, list(shapes), recipe)
    for target, pair in modules.items():
        _check_fits(pair, target, shapes[target.key], lora)
    return modules


def lora_deltas(loras: Sequence[tuple[LoraFile, float]], model: str, shapes: Mapping[str, tuple[int, ...]],
                recipe: Recipe) -> tuple[Iterator[tuple[str, np.ndarray]], list[int]]:
    """(ldm weight key, ΔW float32 in the weight's shape) of `loras` (file, scale) on `model`, whose weights have
    `shapes`, one weight at a time (so a caller holds one ΔW, not a model's worth); and per LoRA the number of
    weights it changes. Every module is matched and checked before the first ΔW."""
    fitted = [(fitted_modules(lora, model, shapes, recipe), scale) for lora, scale in loras]
    parts: dict[str, list[tuple[Target, LoraPair, float]]] = {}  # weight key -> what adds to it
    for modules, scale in fitted:
        for target, pair in modules.items():
            parts.setdefault(target.key, []).append((target, pair, scale))

    def deltas() -> Iterator[tuple[str, np.ndarray]]:
        for key, adding in parts.items():
            placed = [placed_delta(pair, scale, target, shapes[key]) for target, pair, scale in adding]
            yield key, sum(placed[1:], placed[0])

    return deltas(), [len({target.key for target in modules}) for modules, _ in fitted]


def _check_fits(pair: LoraPair, target: Target, shape: tuple[int, ...], lora: LoraFile) -> None:
    """up @ down is (out, in·kh·kw); it fits a weight (out, in) or (out, in, kh, kw), or such a row block of
    one, of as many elements (a 1×1 conv and a linear layer of the same sizes take each other's deltas)."""
    delta = (pair.up.shape[0], math.prod(pair.down.shape[1:]))
    shape = (shape[0] // target.blocks, *shape[1:]) if shape and shape[0] % target.blocks == 0 else ()
    block = f" (row block {target.block} of {target.blocks})" if target.blocks > 1 else ""
    if not shape or delta[0] != shape[0] or math.prod(delta) != math.prod(shape):
        raise UserError(f"LoRA {lora.path.name} does not fit weight {target.key}{block}.",
                        expected=f"a delta of shape {list(shape)}",
                        got=f"up @ down of shape {list(delta)} (up {list(pair.up.shape)}, down {list(pair.down.shape)})",
                        fix="use a LoRA trained for this model's sizes (another architecture or a resized model?)")
