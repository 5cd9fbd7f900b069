"""Eager PyTorch backend: the reference every other backend is measured against.

It rebuilds the models the bundle was exported from (same recipe, same weights: the content
hash must equal the manifest's) and runs the same component wrappers eagerly, in fp32 on the CPU
by default. `BackendOptions.device` / `.dtype` move the models to a CUDA device and cast them to
fp16 or bf16; the GroupNorms the UNet computes in fp32 (ldm's `GroupNorm32`) keep fp32 weights.
Inputs go to the device, outputs come back as numpy in the manifest's dtype. fp32 on CUDA means
fp32: TF32 is off in convolutions and matrix products while a runner runs. Needs torch and
sdcompile; the onnxruntime and tensorrt backends need neither.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np

from sdrun.backends import TORCH_DTYPES, BackendOptions
from sdrun.bundle import Bundle, ComponentRecord
from sdrun.errors import MissingDependencyError, UserError

TORCH_DTYPE_NAMES = dict(zip(TORCH_DTYPES, ("float32", "float16", "bfloat16")))
DEVICE_CHOICES = "cpu | cuda | cuda:N"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the eager models run and in what floating-point dtype."""

    device: object  # torch.device
    dtype: object  # torch.dtype

    @property
    def exact_fp32_on_cuda(self) -> bool:
        import torch

        return self.device.type == "cuda" and self.dtype == torch.float32


def placement_from_options(options: BackendOptions) -> Placement:
    """The device and dtype the options ask for, refused with the fix when this torch cannot serve them."""
    import torch

    name = options.dtype or "fp32"
    if name not in TORCH_DTYPE_NAMES:
        raise UserError(f"unknown torch dtype {name!r}.", expected=" | ".join(TORCH_DTYPES), got=repr(name),
                        fix="pick one of the dtypes above")
    try:
        device = torch.device(options.device or "cpu")
    except (RuntimeError, ValueError):
        raise UserError(f"unknown torch device {options.device!r}.", expected=DEVICE_CHOICES, got=repr(options.device),
                        fix="pass --device cpu or --device cuda") from None
    if device.type == "cuda":
        check_cuda_device(torch, device)
    elif device.type != "cpu":
        raise UserError(f"the torch backend runs on the CPU or a CUDA device, not {device.type!r}.",
                        expected=DEVICE_CHOICES, got=repr(options.device), fix="pass --device cpu or --device cuda")
    return Placement(device, getattr(torch, TORCH_DTYPE_NAMES[name]))


def check_cuda_device(torch, device) -> None:
    if not torch.cuda.is_available():
        raise UserError("--device cuda needs an NVIDIA GPU and a CUDA build of PyTorch, and torch sees no CUDA device.",
                        got=f"torch {torch.__version__} built for CUDA {torch.version.cuda or '(none: a CPU build)'}",
                        fix="run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"there is no CUDA device {device.index}.", expected=f"cuda:0 … cuda:{count - 1}",
                        got=str(device), fix="pick a visible device (nvidia-smi, CUDA_VISIBLE_DEVICES)")


def placed(module, placement: Placement):
    """`module` on the placement's device and dtype; GroupNorms computed in fp32 keep fp32 weights."""
    from sdcompile.models.unet import GroupNorm32

    module = module.to(device=placement.device, dtype=placement.dtype)
    for submodule in module.modules():
        if isinstance(submodule, GroupNorm32):
            submodule.float()
    return module


@contextlib.contextmanager
def exact_fp32(enabled: bool):
    """No TF32 in cuDNN convolutions and cuBLAS matrix products inside the block (restored after it)."""
    if not enabled:
        yield
        return
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchRunner:
    def __init__(self, module, record: ComponentRecord, rebuild_hint: str = "", placement: Placement | None = None):
        self.module, self.record, self.rebuild_hint, self.placement = module, record, rebuild_hint, placement

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode(), exact_fp32(self.placement is not None and self.placement.exact_fp32_on_cuda):
            outputs = self.module(*[self._tensor(feeds[s.name]) for s in self.record.inputs])
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            return {spec.name: output.to(dtype=getattr(torch, spec.dtype)).cpu().numpy()
                    for spec, output in zip(self.record.outputs, outputs, strict=True)}

    def _tensor(self, array: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.placement is None:
            return tensor
        dtype = self.placement.dtype if tensor.is_floating_point() else None
        return tensor.to(device=self.placement.device, dtype=dtype)


def torch_runners(bundle: Bundle, components: list[str], options: BackendOptions) -> dict[str, TorchRunner]:
    try:  # sdcompile's models import torch
        from sdcompile.components import component_spec
        from sdcompile.fingerprint import models_sha256
        from sdcompile.weights import RandomWeights, load_models
    except ImportError:
        raise MissingDependencyError("torch and sdcompile", "for the torch backend",
                                     "pip install sdcompile (with torch)") from None
    placement = placement_from_options(options)
    manifest, recipe = bundle.manifest, bundle.recipe
    source = manifest.source
    models = load_models(recipe, RandomWeights(source["seed"]) if source["kind"] == "random"
                         else Path(source["path"]))
    if models_sha256(models) != manifest.weights_sha256:
        raise UserError("the torch backend rebuilt other weights than the bundle was exported from.",
                        expected=f"weights sha256 {manifest.weights_sha256[:16]}…",
                        fix="check that the checkpoint recorded in manifest.json is unchanged, or re-export")
    return {name: TorchRunner(placed(component_spec(name, recipe).wrap(models, recipe).eval(), placement),
                              bundle.component(name), bundle.rebuild_hint(name), placement) for name in components}
