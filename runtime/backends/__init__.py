"""Backends, registered by name. Each makes one GraphRunner per bundle component."""
from __future__ import annotations

from pathlib import Path

from sdrun.backends.base import GraphRunner
from sdrun.bundle import Manifest
from sdrun.errors import UserError

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def make_runners(backend: str, bundle: Path, manifest: Manifest, components: list[str],
                 **options) -> dict[str, GraphRunner]:
    """Runners for `components` on `backend` (the files are verified against the manifest first)."""
    if backend == "onnxruntime":
        from sdrun.backends.onnxruntime import onnxruntime_runners

        return onnxruntime_runners(bundle, manifest, components, **options)
    if backend == "tensorrt":
        from sdrun.backends.tensorrt import tensorrt_runners

        return tensorrt_runners(bundle, manifest, components)
    if backend == "torch":
        from sdrun.backends.torch import torch_runners

        return torch_runners(bundle, manifest, components)
    raise UserError(f"unknown backend {backend!r}.", expected=" | ".join(("auto", *BACKENDS)),
                    got=repr(backend), fix="pick one of the backends above")
