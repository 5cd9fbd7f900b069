"""The CUDA runtime calls the TensorRT runners make, through CUDA Python, every status checked.

`Cuda` wraps the module (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-bindings 12.6);
`DeviceAllocations` owns the device buffers, page-locked host buffers and streams of one engine
group and releases them together. Nothing here needs TensorRT, so `benchmarks/gpu_check.py`
exercises it on any machine with a GPU and CUDA Python. Imported only when a runner is made.
"""
from __future__ import annotations

import contextlib
import ctypes
import math

import numpy as np

from sdrun.backends.cuda_stack import cuda_bindings_hint, read_driver
from sdrun.errors import MissingDependencyError


def import_cudart():
    """CUDA runtime bindings: `cuda.bindings.runtime` (cuda-bindings >= 12.6) or `cuda.cudart` (older)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MissingDependencyError("cuda-bindings", "for TensorRT's device buffers",
                                         cuda_bindings_hint(read_driver())) from None
    return cudart


class CudaError(RuntimeError):
    """A CUDA runtime call failed (device fault, out of memory, no driver)."""


class Cuda:
    """The CUDA runtime calls the runners need; every call's status is checked."""

    def __init__(self, cudart):
        self.rt = cudart

    def check(self, result):
        """cuda-bindings calls return (status, *values): raise on a failed status, return the values."""
        status, *values = result
        if status != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"CUDA call failed: {getattr(status, 'name', status)}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        return self.check(self.rt.cudaGetDeviceCount())

    def driver_version(self) -> int:
        """The newest CUDA the driver supports, as 1000 * major + 10 * minor (0: no driver)."""
        return self.check(self.rt.cudaDriverGetVersion())

    def compute_capability(self) -> tuple[int, int]:
        device = self.check(self.rt.cudaGetDevice())
        attribute = self.rt.cudaDeviceAttr
        return (self.check(self.rt.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMajor, device)),
                self.check(self.rt.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMinor, device)))

    def device_name(self) -> str:
        properties = self.check(self.rt.cudaGetDeviceProperties(self.check(self.rt.cudaGetDevice())))
        name = properties.name
        return name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        return self.check(self.rt.cudaMemGetInfo())

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, pointer: int) -> None:
        self.check(self.rt.cudaFree(pointer))

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: copies from and to it run as DMA, asynchronously to the host."""
        return int(self.check(self.rt.cudaMallocHost(max(nbytes, 1))))

    def free_host(self, pointer: int) -> None:
        self.check(self.rt.cudaFreeHost(pointer))

    def create_stream(self):
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def is_non_blocking(self, stream) -> bool:
        """True for a stream that never synchronizes with the legacy default stream."""
        return bool(self.check(self.rt.cudaStreamGetFlags(stream)) & self.rt.cudaStreamNonBlocking)

    def destroy_stream(self, stream) -> None:
        self.check(self.rt.cudaStreamDestroy(stream))

    def to_device(self, pointer: int, array: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream))

    def to_host(self, array: np.ndarray, pointer: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream))

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream))


class DeviceAllocations:
    """Every device buffer, page-locked host buffer and stream of one engine group, released together."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.pointers, self.streams, self.host_pointers = cuda, [], [], []

    def malloc(self, nbytes: int) -> int:
        pointer = self.cuda.malloc(nbytes)
        self.pointers.append(pointer)
        return pointer

    def pinned(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A numpy array in page-locked host memory; valid until `release`."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        pointer = self.cuda.malloc_host(nbytes)
        self.host_pointers.append(pointer)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(pointer)
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def stream(self):
        stream = self.cuda.create_stream()
        self.streams.append(stream)
        return stream

    def release(self) -> None:
        # Also runs at interpreter exit, when the CUDA context may already be gone: nothing to free then.
        with contextlib.suppress(CudaError):
            for stream in self.streams:
                self.cuda.synchronize(stream)
            for pointer in self.pointers:
                self.cuda.free(pointer)
            for pointer in self.host_pointers:
                self.cuda.free_host(pointer)
            for stream in self.streams:
                self.cuda.destroy_stream(stream)
        self.pointers, self.streams, self.host_pointers = [], [], []
