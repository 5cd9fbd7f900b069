"""LoRAs merged into the weights at export: each model gets its deltas right after it loads, before it is
hashed and traced, so the bundle's weights (and `weights_sha256`) are the merged ones."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component, ldm_prefixes
from sdcompile.weights.loading import StableDiffusionModels, build_models
from sdrun.errors import UserError
from sdrun.lora import LoraFile, LoraRequest, lora_deltas, lora_record, read_lora
from sdrun.lora.file import PICKLED_SUFFIXES, lora_from_tensors
from sdrun.lora.delta import fitted_modules
from sdrun.lora.names import check_models_exist

MERGED_MODELS = (Component.UNET, Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)


class LoraMerge:
    """The export's LoRAs, each file read and checked once; `apply_` adds their deltas to a loaded model."""

    def __init__(self, requests: Sequence[LoraRequest], recipe: Recipe):
        self.requests, self.recipe = tuple(requests), recipe
        self.files = [read_lora_file(request.path) for request in self.requests]
        self.touched: list[dict[str, int]] = [{} for _ in self.requests]
        if self.files:
            self._check_fit()

    def _check_fit(self) -> None:
        """Every LoRA module is of one of the recipe's models and matches a weight it fits, checked on shapes
        alone (models built on the meta device), so a bad LoRA is refused before any model loads."""
        for lora in self.files:
            check_models_exist((model for model, _ in lora.modules), self.recipe, lora.path)
        with torch.device("meta"):
            modules = build_models(self.recipe, parts=MERGED_MODELS)
        prefixes = ldm_prefixes(self.recipe)
        for part, module in modules.items():
            shapes = {prefixes[part] + key: tuple(value.shape) for key, value in module.state_dict().items()}
            for lora in self.files:
                fitted_modules(lora, part.value, shapes, self.recipe)

    def apply_(self, models: StableDiffusionModels, part: Component) -> None:
        if not self.files or part not in MERGED_MODELS:
            return
        state = models.component(part).state_dict()
        prefix = models.prefixes[part]
        shapes = {prefix + key: tuple(value.shape) for key, value in state.items()}
        loras = [(lora, request.scale) for lora, request in zip(self.files, self.requests)]
        deltas, touched = lora_deltas(loras, part.value, shapes, self.recipe)
        with torch.no_grad():
            for key, delta in deltas:
                weight = state[key[len(prefix):]]
                weight.add_(torch.from_numpy(delta).to(weight.dtype))
        for record, count in zip(self.touched, touched):
            record[part.value] = count

    def records(self) -> list[dict]:
        """Per LoRA: file name, sha256, scale and the tensors changed per model (for the manifest)."""
        return [lora_record(request, lora.sha256, touched)
                for request, lora, touched in zip(self.requests, self.files, self.touched)]


def read_lora_file(path: Path) -> LoraFile:
    """A `.safetensors` LoRA as the runtime reads it; a torch pickle (`.pt`, ...) through the restricted
    unpickler, which rebuilds tensors and runs nothing from the file."""
    path = Path(path)
    if path.suffix not in PICKLED_SUFFIXES or not path.is_file():
        return read_lora(path)
    from sdcompile.weights.unpickler import read_pickled

    state = read_pickled(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"LoRA {path.name} holds no flat dictionary of tensors.",
                        expected="a torch.save of {key: tensor} in the kohya or diffusers layout",
                        fix="save the LoRA's state dict, or a .safetensors copy")
    tensors = {key: value.detach().float().numpy() for key, value in state.items()}
    return lora_from_tensors(path, tensors, {})
