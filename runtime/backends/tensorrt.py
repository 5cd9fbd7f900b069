"""TensorRT runners: one engine per component over CUDA device buffers.

All engines of a bundle share one CUDA stream (never the default stream) and one scratch
allocation: their contexts are created with user-managed device memory and handed the same
buffer, sized for the largest engine. That is safe because the runners execute one after
another on that one stream. Input and output device buffers are allocated once per input
shape and reused.

Cost of the runner protocol (numpy in, numpy out, `tensorrt_runner`): every `run` copies its
inputs to the device, executes, copies its outputs back and synchronizes. For the SD 1.5 UNet at
512x512 with classifier-free guidance that is 0.6 MiB in (sample 2x4x64x64, text embeddings
2x77x768, fp32) and 0.1 MiB out per step. The denoising loop avoids even that: the step-fused
UNet's runner keeps the whole loop on the device (`tensorrt_loop`).

Imports of `tensorrt` and CUDA Python (`cuda.bindings.runtime`, or the older `cuda.cudart`)
happen only when a runner is made or availability is asked. The CUDA calls and allocations live in
`sdrun.backends.cuda`; which driver is here and which extra fits, in `sdrun.backends.cuda_stack`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np


from sdrun.backends import BackendOptions
from sdrun.backends.cuda import Cuda, CudaError, DeviceAllocations, import_cudart
from sdrun.backends.cuda_stack import (DriverInfo, install_hint, installed_cuda_packages, read_driver, stack_fix,
                                       stack_problems)
from sdrun.backends.tensorrt_runner import TensorRTRunner
from sdrun.bundle import Bundle
from sdrun.engine_files import (EngineVerdict, engine_verdict, file_verdict, rebuild_command, stale_engine_error,
                                version_tuple)
from sdrun.errors import MissingDependencyError, UserError

if TYPE_CHECKING:
    import tensorrt as trt

# The oldest release whose Python API has every TensorRT name sdcompile/trt.py and this file use: checked
# against the stubs of 10.8 to 10.13, and 10.8 is the oldest release with published stubs (see
# tests/trt/test_trt_api_names.py). Parsing the opset-23 graphs with the 10.8-10.13 ONNX parsers is
# still to be shown on a GPU.
MIN_TENSORRT = (10, 8)
ATTENTION_TENSORRT = (10, 14)  # first ONNX parser that maps the standard Attention operator (`--attention fused`)
V2_MEMORY_TENSORRT = (10, 1)  # device_memory_size_v2 and set_device_memory(ptr, size)


def import_tensorrt():
    """The real `tensorrt` module; a namespace package (type stubs alone) counts as missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("TensorRT", "to build and run TensorRT engines",
                                     install_hint(read_driver())) from None
    if not hasattr(trt, "Builder"):
        raise MissingDependencyError("TensorRT", "to build and run TensorRT engines (only its type stubs were found)",
                                     install_hint(read_driver()))
    if version_tuple(trt.__version__) < MIN_TENSORRT:
        raise UserError(f"TensorRT {trt.__version__} is too old for sdcompile's engines.",
                        expected=">= " + ".".join(map(str, MIN_TENSORRT)), got=trt.__version__,
                        fix=f"upgrade it: {install_hint(read_driver())}")
    return trt


@dataclasses.dataclass(frozen=True)
class TensorRTProbe:
    """What this process found, asked once: TensorRT and CUDA Python, or the UserError saying why not."""

    trt: object | None
    cuda: Cuda | None
    problem: UserError | None
    device_count: int = 0
    driver: DriverInfo = DriverInfo(None)
    installed: bool = False  # the real TensorRT is installed, whether or not it can run here

    @property
    def present(self) -> bool:
        """TensorRT installed and a GPU the driver sees: from here on a problem is a failure, never a skip."""
        return self.installed and self.driver.device_count > 0


@functools.lru_cache(maxsize=1)
def probe_tensorrt() -> TensorRTProbe:
    """Ask the driver, import TensorRT and CUDA Python, check their CUDA majors and count devices, once."""
    driver = read_driver()
    try:
        trt = import_tensorrt()
    except MissingDependencyError as err:
        return TensorRTProbe(None, None, err, driver=driver)
    except UserError as err:
        return TensorRTProbe(None, None, err, driver=driver, installed=True)
    too_new = stack_problems(driver.cuda_version, installed_cuda_packages())
    if too_new:
        problem = UserError(f"TensorRT cannot run here: {'; '.join(too_new)}.", fix=stack_fix(driver))
        return TensorRTProbe(trt, None, problem, driver=driver, installed=True)
    try:
        cuda = Cuda(import_cudart())
    except UserError as err:
        return TensorRTProbe(trt, None, err, driver=driver, installed=True)
    return probe_devices(trt, cuda, driver)


def probe_devices(trt, cuda: Cuda, driver: DriverInfo) -> TensorRTProbe:
    """The probe once TensorRT and CUDA Python imported: usable when CUDA Python counts a device."""
    fix = "run on a machine with an NVIDIA GPU, check CUDA_VISIBLE_DEVICES and nvidia-smi, or use --backend onnxruntime"
    try:
        count = cuda.device_count()
    except CudaError as err:
        problem = UserError(f"TensorRT needs an NVIDIA GPU and driver, and CUDA reports none usable ({err}; "
                            f"found: {driver.description}).", fix=fix)
        return TensorRTProbe(trt, cuda, problem, driver=driver, installed=True)
    if count == 0:
        problem = UserError(f"TensorRT needs an NVIDIA GPU, and no CUDA device is visible (found: "
                            f"{driver.description}).", fix=fix)
        return TensorRTProbe(trt, cuda, problem, driver=driver, installed=True)
    return TensorRTProbe(trt, cuda, None, count, driver, installed=True)


def tensorrt_available() -> tuple[bool, str]:
    """(True, description) when TensorRT, CUDA Python and a CUDA device are all present; else (False, reason)."""
    probe = probe_tensorrt()
    if probe.problem:
        return False, f"{probe.problem.problem} {probe.problem.fix}"
    return True, f"TensorRT {probe.trt.__version__}; {probe.driver.description}"


def require_tensorrt() -> tuple:
    """(tensorrt module, Cuda) or a UserError (exit code 2) saying what to install or why no GPU."""
    probe = probe_tensorrt()
    if probe.problem:
        raise probe.problem
    return probe.trt, probe.cuda


def tensorrt_fallback_reason(bundle: Bundle, components: list[str]) -> str | None:
    """Why `--backend auto` cannot use TensorRT for these components (None: it can).

    Checks packages, device and the manifest's engine records; engine files are hashed only
    when the runners load them.
    """
    available, reason = tensorrt_available()
    if not available:
        return reason
    trt, cuda = require_tensorrt()
    capability = cuda.compute_capability()
    for name in components:
        if name not in bundle.manifest.components:
            return f"the bundle has no component {name!r}"
        verdict = engine_verdict(bundle.manifest.components[name], trt.__version__, capability)
        if not verdict.usable:
            return f"{name}: {verdict.reason.value}; build it with {rebuild_command(bundle.root, name)}"
    return None


def tensorrt_runners(bundle: Bundle, components: list[str], options: BackendOptions) -> dict:
    """One TensorRT runner per component, sharing a stream and a scratch allocation.

    Refuses (UserError naming the rebuild command) any engine built by another TensorRT, for
    another GPU architecture, from another ONNX graph, or whose file changed.
    """
    trt, cuda = require_tensorrt()
    if options.profile_dir is not None and options.cuda_graph:
        raise UserError("--profile times every TensorRT layer, which a replayed CUDA graph does not report.",
                        fix="drop --cuda-graph or --profile")
    return EngineGroup(bundle, components, trt, cuda, options.cuda_graph, options.initializers or {},
                       profile=options.profile_dir is not None).runners


@dataclasses.dataclass(frozen=True)
class DeviceMemoryApi:
    """Sizing and attaching user-managed context memory: the V2 calls from TensorRT 10.1 on."""

    v2: bool

    @classmethod
    def for_version(cls, tensorrt_version: str) -> "DeviceMemoryApi":
        return cls(version_tuple(tensorrt_version) >= V2_MEMORY_TENSORRT)

    def size(self, engine: trt.ICudaEngine) -> int:
        return engine.device_memory_size_v2 if self.v2 else engine.device_memory_size

    def attach(self, context: trt.IExecutionContext, pointer: int, size: int) -> None:
        if self.v2:
            context.set_device_memory(pointer, size)
        else:
            context.device_memory = pointer


class EngineGroup:
    """Engines, contexts, the stream and every device allocation of one bundle's TensorRT runners."""

    def __init__(self, bundle: Bundle, components: list[str], trt, cuda: Cuda, cuda_graph: bool = False,
                 weights: Mapping[str, Mapping[str, np.ndarray]] = MappingProxyType({}), profile: bool = False):
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        capability = cuda.compute_capability()
        verdicts = {n: engine_verdict(bundle.component(n), trt.__version__, capability) for n in components}
        for verdict in verdicts.values():
            if not verdict.usable:
                raise stale_engine_error(bundle.root, verdict)
        engines = {n: engine_from_bundle(runtime, bundle.root, v) for n, v in verdicts.items()}
        for name, replaced in weights.items():  # LoRAs swapped in: refit before any context exists
            if name in engines and replaced:
                refit_engine(trt, engines[name], self.logger, dict(replaced),
                             rebuild_command(bundle.root, name, verdicts[name].record.static))
        self.cuda, self.allocations = cuda, DeviceAllocations(cuda)
        self.runners: dict[str, TensorRTRunner] = {}
        self._finalizer = weakref.finalize(self, release_group, self.runners, self.allocations)
        self.stream = self.allocations.stream()
        memory = DeviceMemoryApi.for_version(trt.__version__)
        scratch_size = max((memory.size(engine) for engine in engines.values()), default=0)
        scratch = self.allocations.malloc(scratch_size)
        for name, engine in engines.items():
            context = context_with_memory(trt, engine, memory, scratch, scratch_size)
            hint = rebuild_command(bundle.root, name, verdicts[name].record.static)
            self.runners[name] = TensorRTRunner(self, engine, context, bundle.component(name), verdicts[name],
                                                hint, trt, cuda_graph, profile)

    def close(self) -> None:
        """Drop the contexts and free every device allocation now (also done when collected)."""
        for runner in self.runners.values():
            runner.context = None
        self._finalizer()


def release_group(runners: dict, allocations: DeviceAllocations) -> None:
    """Page-locked staging and captured graphs first, then the device memory and the stream."""
    with contextlib.suppress(CudaError):
        for runner in runners.values():
            runner.release()
    allocations.release()


def context_with_memory(trt, engine: trt.ICudaEngine, memory: DeviceMemoryApi, pointer: int,
                        size: int) -> trt.IExecutionContext:
    """An execution context that runs in the caller's device memory instead of allocating its own."""
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise CudaError(f"TensorRT could not create an execution context for {engine.name}")
    memory.attach(context, pointer, size)
    return context


def refit_engine(trt, engine: trt.ICudaEngine, logger: trt.ILogger, weights: dict[str, np.ndarray],
                 rebuild_hint: str) -> None:
    """Replace named weights of a refittable engine (W + ΔW of a LoRA, keyed by ONNX initializer name, which
    TensorRT's ONNX parser gives the weights it imports) with `trt.Refitter`, on the host copies."""
    if not engine.refittable:
        raise UserError(f"the TensorRT engine {engine.name} was built without --refittable, so a LoRA cannot "
                        "be applied to it at run time.", fix=f"rebuild it: {rebuild_hint} --refittable")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    folded = sorted(set(weights) - known)
    if folded:
        raise UserError(f"TensorRT folded {len(folded)} of the weights a LoRA changes into other layers of "
                        f"{engine.name}, so they cannot be refit.", got=", ".join(folded[:5]),
                        fix="merge the LoRA at export instead: sdcompile export --lora FILE[:SCALE]")
    arrays = {name: np.ascontiguousarray(values) for name, values in weights.items()}  # alive until the refit
    for name, values in arrays.items():
        if not refitter.set_named_weights(name, trt.Weights(values)):
            raise UserError(f"TensorRT refused new values for {name} ({values.dtype}, {values.shape}).",
                            fix="check that the LoRA was made for this model")
    if refitter.get_missing_weights() or not refitter.refit_cuda_engine():
        raise UserError(f"TensorRT could not refit {engine.name}.", got=", ".join(refitter.get_missing_weights()[:5]),
                        fix="merge the LoRA at export instead: sdcompile export --lora FILE[:SCALE]")


def engine_from_bundle(runtime: trt.Runtime, bundle: Path, verdict: EngineVerdict) -> trt.ICudaEngine:
    """Read, hash-check and deserialize the plan of a usable verdict."""
    path = bundle / verdict.record.file
    data = path.read_bytes() if path.is_file() else None
    checked = file_verdict(verdict, hashlib.sha256(data).hexdigest() if data is not None else None)
    if not checked.usable:
        raise stale_engine_error(bundle, checked)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise UserError(f"TensorRT could not load the engine {path} (see the TensorRT error above).",
                        fix=f"rebuild it: {rebuild_command(bundle, verdict.component, verdict.record.static)}")
    return engine
