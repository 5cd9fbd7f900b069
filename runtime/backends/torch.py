"""Eager PyTorch backend: the reference every other backend is measured against.

It rebuilds the models the bundle was exported from (same recipe, same weights: the content
hash must equal the manifest's) and runs the same component wrappers eagerly in fp32. Needs
torch and sdcompile; the onnxruntime and tensorrt backends need neither.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrun.backends import BackendOptions
from sdrun.bundle import Bundle, ComponentRecord
from sdrun.errors import MissingDependencyError, UserError


class TorchRunner:
    def __init__(self, module, record: ComponentRecord, rebuild_hint: str = ""):
        self.module, self.record, self.rebuild_hint = module, record, rebuild_hint

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.record.inputs]
            output = self.module(*args)
        return {self.record.outputs[0].name: output.numpy()}


def torch_runners(bundle: Bundle, components: list[str], options: BackendOptions) -> dict[str, TorchRunner]:
    try:
        import torch  # noqa: F401

        from sdcompile.components import component_spec
        from sdcompile.fingerprint import models_sha256
        from sdcompile.weights import RandomWeights, load_models
    except ImportError:
        raise MissingDependencyError("torch and sdcompile", "for the torch backend",
                                     "pip install sdcompile (with torch)") from None
    manifest, recipe = bundle.manifest, bundle.recipe
    source = manifest.source
    models = load_models(recipe, RandomWeights(source["seed"]) if source["kind"] == "random"
                         else Path(source["path"]))
    if models_sha256(models) != manifest.weights_sha256:
        raise UserError("the torch backend rebuilt other weights than the bundle was exported from.",
                        expected=f"weights sha256 {manifest.weights_sha256[:16]}…",
                        fix="check that the checkpoint recorded in manifest.json is unchanged, or re-export")
    return {name: TorchRunner(component_spec(name, recipe).wrap(models, recipe).eval(), bundle.component(name),
                              bundle.rebuild_hint(name)) for name in components}
