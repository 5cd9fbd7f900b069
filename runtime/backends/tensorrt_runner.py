"""One TensorRT engine behind the runner protocol: numpy in, numpy out, over device buffers kept per shape.

Every I/O tensor of the engine gets a device address, the outputs the manifest does not list
included (TensorRT refuses to run otherwise); only the manifest's outputs are copied back. Host
staging is page-locked (one DMA per copy) and, like the device buffers, allocated once per set of
input shapes. The step-fused UNet's runner also offers `resident_loop`: the whole denoising loop
on the device (`sdrun.backends.tensorrt_loop`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from sdrun.backends.tensorrt_loop import PinnedArrays, ResidentLoop
from sdrun.bundle import ComponentRecord
from sdrun.engine_files import EngineVerdict, check_input_shapes
from sdrun.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt

    from sdrun.backends.tensorrt import EngineGroup

STEP_FUSED = "unet_step"


class TensorRTRunError(RuntimeError):
    """TensorRT could not enqueue an engine (its own error message is printed above)."""


@dataclasses.dataclass
class ShapeBuffers:
    """Device buffers for one set of input shapes, and the page-locked host arrays copies go through."""

    device: dict  # every engine I/O tensor name -> device pointer
    host_inputs: dict  # input name -> pinned np.ndarray in the engine's dtype
    host_outputs: dict  # manifest output name -> pinned np.ndarray in the engine's dtype


class TensorRTRunner:
    """One engine; `run` takes and returns numpy arrays keyed by the manifest's tensor names."""

    def __init__(self, group: EngineGroup, engine: trt.ICudaEngine, context: trt.IExecutionContext,
                 record: ComponentRecord, verdict: EngineVerdict, rebuild_hint: str, trt, cuda_graph: bool = False,
                 profile: bool = False):
        self.group, self.engine, self.context = group, engine, context
        self.record, self.profile, self.rebuild_hint = record, verdict.record.profile, rebuild_hint
        self.dtypes = engine_tensor_dtypes(engine, record, rebuild_hint, trt)
        self.outputs = [n for n in self.dtypes if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.pinned = PinnedArrays(group.cuda)
        self._buffers: dict[tuple, ShapeBuffers] = {}
        self._bound: tuple | None = None
        self.resident_loop = ResidentLoop(self, cuda_graph) if record.name == STEP_FUSED else None
        self.layer_times = attach_layer_profiler(trt, context) if profile else None

    def end_profile(self) -> list[dict]:
        """Chrome trace events of every layer time TensorRT's IProfiler reported (empty without profiling)."""
        return [] if self.layer_times is None else self.layer_times.events

    def device_used_bytes(self) -> int:
        """Device memory in use on this runner's GPU, by every process (cudaMemGetInfo: total − free)."""
        free, total = self.group.cuda.memory_info()
        return total - free

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {spec.name: tuple(np.shape(feeds[spec.name])) for spec in self.record.inputs}
        check_input_shapes(self.record.name, shapes, self.profile, self.rebuild_hint)
        buffers = self._bind(shapes)
        cuda, stream = self.group.cuda, self.group.stream
        for name, host in buffers.host_inputs.items():
            np.copyto(host, feeds[name], casting="unsafe")
            cuda.to_device(buffers.device[name], host, stream)
        self.execute(stream)
        for name, host in buffers.host_outputs.items():
            cuda.to_host(host, buffers.device[name], stream)
        cuda.synchronize(stream)
        return {spec.name: _as_dtype(buffers.host_outputs[spec.name], spec.dtype) for spec in self.record.outputs}

    def execute(self, stream) -> None:
        """Enqueue the engine on `stream` with the addresses and shapes bound now."""
        if not self.context.execute_async_v3(int(stream)):
            raise TensorRTRunError(f"TensorRT failed to run {self.record.name} (see the TensorRT error above)")

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise UserError(f"TensorRT refused shape {list(shape)} for input {name!r} of {self.record.name}.",
                            fix=f"rebuild with a profile that covers it: {self.rebuild_hint}")
        self._bound = None

    def set_address(self, name: str, pointer: int) -> None:
        self.context.set_tensor_address(name, pointer)
        self._bound = None

    def output_bytes(self, names: list[str]) -> dict[str, int]:
        """Bytes of each named output at the input shapes set now."""
        return {n: math.prod(self.context.get_tensor_shape(n)) * self.dtypes[n].itemsize for n in names}

    def unread_output_bytes(self, read: set[str]) -> dict[str, int]:
        """Bytes of the engine outputs a caller does not read, which still need an address."""
        return self.output_bytes([n for n in self.outputs if n not in read])

    def device_pointers(self) -> dict[str, int]:
        """Tensor name -> device address bound now (empty before the first run); for inspection."""
        return dict(self._buffers[self._bound].device) if self._bound in self._buffers else {}

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> ShapeBuffers:
        """Set input shapes and tensor addresses; allocate buffers the first time a shape is seen."""
        key = tuple(shapes.items())
        if key == self._bound:
            return self._buffers[key]
        for name, shape in shapes.items():
            self.set_input_shape(name, shape)
        if key not in self._buffers:
            self._buffers[key] = self._allocate(shapes)
        for name, pointer in self._buffers[key].device.items():
            self.set_address(name, pointer)
        self._bound = key
        return self._buffers[key]

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> ShapeBuffers:
        malloc = self.group.allocations.malloc
        sizes = {name: math.prod(shape) * self.dtypes[name].itemsize for name, shape in shapes.items()}
        sizes |= self.output_bytes(self.outputs)
        listed = [spec.name for spec in self.record.outputs]
        return ShapeBuffers(
            device={name: malloc(nbytes) for name, nbytes in sizes.items()},
            host_inputs={name: self.pinned.empty(shape, self.dtypes[name]) for name, shape in shapes.items()},
            host_outputs={name: self.pinned.empty(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
                          for name in listed})

    def release(self) -> None:
        """Free the page-locked staging and the resident loop's graphs (device memory is the group's)."""
        if self.resident_loop is not None:
            self.resident_loop.release()
        self.pinned.release()
        self._buffers, self._bound = {}, None


def attach_layer_profiler(trt, context: trt.IExecutionContext):
    """A `trt.IProfiler` set on `context`: each enqueue then reports every layer's time (and waits for the
    GPU, so profiled runs are slower). Its `events` are Chrome trace events, layers laid end to end."""

    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.events: list[dict] = []
            self.clock_us = 0.0

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.events.append({"cat": "Node", "name": layer_name, "ph": "X", "ts": self.clock_us, "dur": ms * 1e3,
                                "pid": 0, "tid": 0, "args": {"layer": layer_name}})
            self.clock_us += ms * 1e3

    profiler = LayerTimes()
    context.profiler = profiler
    return profiler


def engine_tensor_dtypes(engine: trt.ICudaEngine, record: ComponentRecord, rebuild_hint: str, trt) -> dict:
    """numpy dtype of every engine I/O tensor; refuses an engine whose inputs or listed outputs differ."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
    expected_inputs = {s.name for s in record.inputs}
    expected_outputs = {s.name for s in record.outputs}
    if inputs != expected_inputs or not expected_outputs <= set(names) - inputs:
        raise UserError(f"the TensorRT engine of {record.name} has other inputs/outputs than the manifest.",
                        expected=f"inputs {sorted(expected_inputs)}, outputs {sorted(expected_outputs)}",
                        got=f"inputs {sorted(inputs)}, outputs {sorted(set(names) - inputs)}",
                        fix=f"rebuild it: {rebuild_hint}")
    return {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """Outputs in the manifest's dtype (a copy either way: the pinned buffer is reused by the next call)."""
    return array.astype(dtype, copy=True)
