"""The backend registry: every backend makes runners with one signature, and `auto` is resolved here.

A factory takes an opened bundle (its files already verified), the components to load and the
options, and returns one `GraphRunner` per component. Factories are imported only when used, so
choosing onnxruntime never imports torch or TensorRT.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sdrun.backends.base import GraphRunner
from sdrun.bundle import Bundle
from sdrun.errors import UserError

# name -> "module:factory", each factory `(bundle, components, options) -> {component: GraphRunner}`
BACKENDS = {
    "onnxruntime": "sdrun.backends.onnxruntime:onnxruntime_runners",
    "tensorrt": "sdrun.backends.tensorrt:tensorrt_runners",
    "torch": "sdrun.backends.torch:torch_runners",
}
AUTO = "auto"
# Backends that cannot take swapped-in weights (`--lora` on a plain bundle), and why.
NO_LORA_SWAP = {
    "torch": "is the eager reference of the bundle's own weights",
}
BACKEND_CHOICES = (AUTO, *BACKENDS)
TORCH_DTYPES = ("fp32", "fp16", "bf16")  # what the torch backend computes in


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What a caller may tune; None means the backend's default. Options a backend has no use for are ignored."""

    threads: int | None = None  # ONNX Runtime intra-op threads
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers, in order of preference
    cuda_graph: bool = False  # TensorRT: replay one captured denoising step (static-shape engines)
    device: str | None = None  # torch: "cpu", "cuda" or "cuda:N"; None: the CPU
    dtype: str | None = None  # torch: one of TORCH_DTYPES; None: fp32
    # Per component, initializer name -> replacement value (LoRAs swapped in, `sdrun.lora.swap`): ONNX Runtime
    # session initializers; TensorRT refits engines built with `build-trt --refittable`.
    initializers: Mapping[str, Mapping[str, np.ndarray]] | None = None
    # Where the backend's own operator profile goes (`sdrun.profiling`): ONNX Runtime's profiler, TensorRT's
    # per-layer IProfiler; None: no profiling.
    profile_dir: Path | None = None


Factory = Callable[[Bundle, Sequence[str], BackendOptions], dict[str, GraphRunner]]


def backend_factory(name: str) -> Factory:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}.", expected=" | ".join(BACKEND_CHOICES), got=repr(name),
                        fix="pick one of the backends above")
    module, attribute = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def make_runners(backend: str, bundle: Bundle, components: Sequence[str],
                 options: BackendOptions = BackendOptions()) -> dict[str, GraphRunner]:
    """Runners for `components` of an opened bundle on `backend` (a name from BACKENDS, not `auto`)."""
    return backend_factory(backend)(bundle, list(components), options)


def check_lora_swap(backend: str) -> None:
    """Refuse `--lora` on a backend that cannot swap weights in."""
    if backend in NO_LORA_SWAP:
        raise UserError(f"--lora at run time {NO_LORA_SWAP[backend]} on the {backend} backend.",
                        expected="--backend onnxruntime", got=f"--backend {backend}",
                        fix="run with --backend onnxruntime, or merge the LoRA at export: sdcompile export "
                            "--lora FILE[:SCALE]")


def resolve_backend(name: str, bundle: Bundle, components: Sequence[str], echo: Callable[[str], None]) -> str:
    """`auto`: TensorRT when it is installed, a GPU is present and the engines fit; else ONNX Runtime, said aloud.

    An explicit `tensorrt` is checked here too, so a missing TensorRT is reported before any loading.
    """
    if name not in BACKEND_CHOICES:
        backend_factory(name)
    if name not in (AUTO, "tensorrt"):
        return name
    from sdrun.backends.tensorrt import require_tensorrt, tensorrt_fallback_reason

    if name == "tensorrt":
        require_tensorrt()
        return name
    reason = tensorrt_fallback_reason(bundle, components)
    if reason is None:
        return "tensorrt"
    echo(f"TensorRT unavailable ({reason}); using onnxruntime")
    return "onnxruntime"
