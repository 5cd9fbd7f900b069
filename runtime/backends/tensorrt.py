"""TensorRT runners: one engine per component over CUDA device buffers.

All engines of a bundle share one CUDA stream (never the default stream) and one scratch
allocation: their contexts are created with user-managed device memory and handed the same
buffer, sized for the largest engine. That is safe because the runners execute one after
another on that one stream. Input and output device buffers are allocated once per input
shape and reused.

Cost of the runner protocol (numpy in, numpy out): every `run` copies its inputs to the device,
executes, copies its outputs back and synchronizes. For the SD 1.5 UNet at 512x512 with
classifier-free guidance that is 0.6 MiB in (sample 2x4x64x64, text embeddings 2x77x768, fp32)
and 0.1 MiB out per step, tens of microseconds over PCIe against milliseconds of UNet time,
plus one host synchronization per call. Results stay valid until the same runner runs again.

Imports of `tensorrt` and CUDA Python (`cuda.bindings.runtime`, or the older `cuda.cudart`)
happen only when a runner is made or availability is asked. The CUDA calls and allocations live in
`sdrun.backends.cuda`; which driver is here and which extra fits, in `sdrun.backends.cuda_stack`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrun.backends import BackendOptions
from sdrun.backends.cuda import Cuda, CudaError, DeviceAllocations, import_cudart
from sdrun.backends.cuda_stack import (DriverInfo, install_hint, installed_cuda_packages, read_driver, stack_fix,
                                       stack_problems)
from sdrun.bundle import Bundle, ComponentRecord
from sdrun.engine_files import (EngineVerdict, check_input_shapes, engine_verdict, file_verdict, rebuild_command,
                                stale_engine_error, version_tuple)
from sdrun.errors import MissingDependencyError, UserError

if TYPE_CHECKING:
    import tensorrt as trt

MIN_TENSORRT = (10, 0)  # name-based tensor API, enqueueV3 only, ExecutionContextAllocationStrategy
ATTENTION_TENSORRT = (10, 14)  # first ONNX parser that maps the standard Attention operator
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
    return EngineGroup(bundle, components, trt, cuda).runners


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

    def __init__(self, bundle: Bundle, components: list[str], trt, cuda: Cuda):
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        capability = cuda.compute_capability()
        verdicts = {n: engine_verdict(bundle.component(n), trt.__version__, capability) for n in components}
        for verdict in verdicts.values():
            if not verdict.usable:
                raise stale_engine_error(bundle.root, verdict)
        engines = {n: engine_from_bundle(runtime, bundle.root, v) for n, v in verdicts.items()}
        self.cuda, self.allocations = cuda, DeviceAllocations(cuda)
        self._finalizer = weakref.finalize(self, self.allocations.release)
        self.stream = self.allocations.stream()
        memory = DeviceMemoryApi.for_version(trt.__version__)
        scratch_size = max((memory.size(engine) for engine in engines.values()), default=0)
        scratch = self.allocations.malloc(scratch_size)
        self.runners = {}
        for name, engine in engines.items():
            context = context_with_memory(trt, engine, memory, scratch, scratch_size)
            hint = rebuild_command(bundle.root, name, verdicts[name].record.static)
            self.runners[name] = TensorRTRunner(self, engine, context, bundle.component(name), verdicts[name],
                                                hint, trt)

    def close(self) -> None:
        """Drop the contexts and free every device allocation now (also done when collected)."""
        for runner in self.runners.values():
            runner.context = None
        self._finalizer()


def context_with_memory(trt, engine: trt.ICudaEngine, memory: DeviceMemoryApi, pointer: int,
                        size: int) -> trt.IExecutionContext:
    """An execution context that runs in the caller's device memory instead of allocating its own."""
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise CudaError(f"TensorRT could not create an execution context for {engine.name}")
    memory.attach(context, pointer, size)
    return context


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


@dataclasses.dataclass
class ShapeBuffers:
    """Device buffers for one set of input shapes, and the host arrays outputs are copied into."""

    device: dict  # tensor name -> device pointer
    host_outputs: dict  # output name -> np.ndarray in the engine's dtype


class TensorRTRunner:
    """One engine; `run` takes and returns numpy arrays keyed by the manifest's tensor names."""

    def __init__(self, group: EngineGroup, engine: trt.ICudaEngine, context: trt.IExecutionContext,
                 record: ComponentRecord, verdict: EngineVerdict, rebuild_hint: str, trt):
        self.group, self.engine, self.context = group, engine, context
        self.record, self.profile, self.rebuild_hint = record, verdict.record.profile, rebuild_hint
        self.dtypes = engine_tensor_dtypes(engine, record, rebuild_hint, trt)
        self._buffers: dict[tuple, ShapeBuffers] = {}
        self._bound: tuple | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {spec.name: tuple(np.shape(feeds[spec.name])) for spec in self.record.inputs}
        check_input_shapes(self.record.name, shapes, self.profile, self.rebuild_hint)
        buffers = self._bind(shapes)
        cuda, stream = self.group.cuda, self.group.stream
        staged = [np.ascontiguousarray(feeds[name], dtype=self.dtypes[name]) for name in shapes]
        for name, host in zip(shapes, staged):
            cuda.to_device(buffers.device[name], host, stream)
        if not self.context.execute_async_v3(int(stream)):
            raise CudaError(f"TensorRT failed to run {self.record.name} (see the TensorRT error above)")
        for name, host in buffers.host_outputs.items():
            cuda.to_host(host, buffers.device[name], stream)
        cuda.synchronize(stream)
        return {spec.name: _as_dtype(buffers.host_outputs[spec.name], spec.dtype) for spec in self.record.outputs}

    def device_pointers(self) -> dict[str, int]:
        """Tensor name -> device address bound for the last run's shapes (empty before the first run); a copy."""
        return dict(self._buffers[self._bound].device) if self._bound is not None else {}

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> ShapeBuffers:
        """Set input shapes and tensor addresses; allocate buffers the first time a shape is seen."""
        key = tuple(shapes.items())
        if key == self._bound:
            return self._buffers[key]
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise UserError(f"TensorRT refused shape {list(shape)} for input {name!r} of {self.record.name}.",
                                fix=f"rebuild with a profile that covers it: {self.rebuild_hint}")
        if key not in self._buffers:
            self._buffers[key] = self._allocate(shapes)
        for name, pointer in self._buffers[key].device.items():
            self.context.set_tensor_address(name, pointer)
        self._bound = key
        return self._buffers[key]

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> ShapeBuffers:
        allocations = self.group.allocations
        outputs = {spec.name: np.empty(tuple(self.context.get_tensor_shape(spec.name)), dtype=self.dtypes[spec.name])
                   for spec in self.record.outputs}
        device = {name: allocations.malloc(math.prod(shape) * self.dtypes[name].itemsize)
                  for name, shape in shapes.items()}
        device.update({name: allocations.malloc(array.nbytes) for name, array in outputs.items()})
        return ShapeBuffers(device, outputs)


def engine_tensor_dtypes(engine: trt.ICudaEngine, record: ComponentRecord, rebuild_hint: str, trt) -> dict:
    """numpy dtype of every manifest tensor as the engine holds it; refuses an engine whose I/O differ."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
    expected_inputs = {s.name for s in record.inputs}
    expected_outputs = {s.name for s in record.outputs}
    if inputs != expected_inputs or not expected_outputs <= set(names) - inputs:
        raise UserError(f"the TensorRT engine of {record.name} has other inputs/outputs than the manifest.",
                        expected=f"inputs {sorted(expected_inputs)}, outputs {sorted(expected_outputs)}",
                        got=f"inputs {sorted(inputs)}, outputs {sorted(set(names) - inputs)}",
                        fix=f"rebuild it: {rebuild_hint}")
    return {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in expected_inputs | expected_outputs}


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """Outputs in the manifest's dtype, whatever precision the engine computes its I/O in."""
    return array if array.dtype == np.dtype(dtype) else array.astype(dtype)
