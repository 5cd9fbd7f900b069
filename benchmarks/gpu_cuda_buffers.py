"""GPU check, no TensorRT needed: the runtime's CUDA buffer management through cuda-bindings.

Exercises what the TensorRT runners stand on (`sdrun.backends.cuda`): the driver as CUDA Python sees
it, a non-default stream, device buffers of the runners' I/O shapes reused over several round trips,
page-locked host buffers, one scratch allocation shared by two users in turn, and release. Every
round trip carries random bytes host -> device -> host and is compared bit for bit; copy bandwidth
from page-locked and from pageable memory is measured.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.gpu_parts import Check, PartResult, Status

MIB = 2**20
# The SD 1.5 UNet's I/O at 512² with guidance, the text encoder's ids, and a decoded image.
ROUND_TRIP_SHAPES = (((2, 4, 64, 64), "float32"), ((2, 77, 768), "float16"), ((2, 77), "int32"),
                     ((1, 3, 512, 512), "float32"))
ROUND_TRIPS = 3  # per shape, through the same device buffer ("steps")
SCRATCH_USERS_MIB = (64, 256)  # two engines' scratch needs; the allocation is sized for the larger
BANDWIDTH_MIB = 256
RELEASE_SLACK_MIB = 64  # free memory after release may sit this far below the baseline (driver pools)


def cuda_buffer_part() -> PartResult:
    from sdrun.backends.cuda import Cuda, DeviceAllocations, import_cudart
    from sdrun.backends.cuda_stack import installed_cuda_packages, read_driver, stack_fix, stack_problems

    driver = read_driver()
    too_new = stack_problems(driver.cuda_version, installed_cuda_packages())
    if too_new:
        return PartResult("cuda buffers", Status.FAILED, f"{'; '.join(too_new)}; fix: {stack_fix(driver)}")
    cuda = Cuda(import_cudart())
    baseline = cuda.memory_info()[0]
    allocations = DeviceAllocations(cuda)
    rng = np.random.default_rng(0)
    try:
        checks = [driver_check(cuda, driver.cuda_version)]
        stream = allocations.stream()
        checks.append(Check("non-default stream", cuda.is_non_blocking(stream) and int(stream) not in (0, 1, 2),
                            f"handle {int(stream):#x}, non-blocking"))
        checks += [round_trip_check(cuda, allocations, stream, shape, dtype, rng) for shape, dtype in ROUND_TRIP_SHAPES]
        checks.append(shared_scratch_check(cuda, allocations, stream, rng))
        bandwidth = copy_bandwidth(cuda, allocations, stream)
        held = baseline - cuda.memory_info()[0]
    finally:
        allocations.release()
    checks.append(release_check(cuda, allocations, baseline, held))
    return PartResult.from_checks("cuda buffers", checks, {"copy_gb_per_s": bandwidth, "held_mib": held / MIB})


def driver_check(cuda, ctypes_version: int | None) -> Check:
    from sdrun.backends.cuda_stack import cuda_version_text

    seen = cuda.driver_version()
    return Check("driver version", seen == ctypes_version and seen > 0,
                 f"CUDA Python: CUDA {cuda_version_text(seen)}, libcuda: "
                 f"{cuda_version_text(ctypes_version) if ctypes_version else 'none'}")


def random_array(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes viewed as `dtype`: every bit pattern, so a copy that drops or reorders any is caught."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, nbytes, dtype=np.uint8).view(dtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def round_trip_check(cuda, allocations, stream, shape, dtype, rng) -> Check:
    """ROUND_TRIPS copies through one device buffer: pageable in, page-locked out, and page-locked in, pageable out."""
    device = allocations.malloc(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    pinned_in, pinned_out = allocations.pinned(shape, dtype), allocations.pinned(shape, dtype)
    count = len(allocations.pointers)
    exact = []
    for _ in range(ROUND_TRIPS):
        pageable = random_array(shape, dtype, rng)
        cuda.to_device(device, pageable, stream)
        cuda.to_host(pinned_out, device, stream)
        pinned_in[...] = random_array(shape, dtype, rng)
        back = np.empty(shape, dtype)
        cuda.synchronize(stream)
        exact.append(same_bits(pageable, pinned_out))
        cuda.to_device(device, pinned_in, stream)
        cuda.to_host(back, device, stream)
        cuda.synchronize(stream)
        exact.append(same_bits(pinned_in, back))
    reused = len(allocations.pointers) == count
    return Check(f"round trip {dtype} {list(shape)}", all(exact) and reused,
                 f"{sum(exact)}/{len(exact)} copies bit-exact through one buffer {device:#x}"
                 + ("" if reused else "; it was reallocated"))


def shared_scratch_check(cuda, allocations, stream, rng) -> Check:
    """One allocation sized for the larger user; each user writes and reads its own data in turn on the stream."""
    before = len(allocations.pointers)
    scratch = allocations.malloc(max(SCRATCH_USERS_MIB) * MIB)
    exact = []
    for size in SCRATCH_USERS_MIB:
        data = random_array((size * MIB,), "uint8", rng)
        back = allocations.pinned(data.shape, data.dtype)
        cuda.to_device(scratch, data, stream)
        cuda.to_host(back, scratch, stream)
        cuda.synchronize(stream)
        exact.append(same_bits(data, back))
    one = len(allocations.pointers) == before + 1
    return Check("shared scratch", all(exact) and one,
                 f"{' and '.join(f'{s} MiB' for s in SCRATCH_USERS_MIB)} users in one {max(SCRATCH_USERS_MIB)} MiB "
                 f"allocation, {sum(exact)}/{len(exact)} bit-exact")


def copy_bandwidth(cuda, allocations, stream, repeats: int = 5) -> dict[str, float]:
    """Median host-to-device GB/s from page-locked and from pageable memory."""
    nbytes = BANDWIDTH_MIB * MIB
    device = allocations.malloc(nbytes)
    sources = {"pinned": allocations.pinned((nbytes,), "uint8"), "pageable": np.ones(nbytes, np.uint8)}
    rates = {}
    for name, source in sources.items():
        seconds = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            cuda.to_device(device, source, stream)
            cuda.synchronize(stream)
            seconds.append(time.perf_counter() - start)
        rates[f"{name}_host_to_device"] = round(nbytes / statistics.median(seconds[1:]) / 1e9, 2)
    return rates


def release_check(cuda, allocations, baseline: int, held: int) -> Check:
    returned = cuda.memory_info()[0]
    empty = not (allocations.pointers or allocations.host_pointers or allocations.streams)
    expected = (max(SCRATCH_USERS_MIB) + BANDWIDTH_MIB - RELEASE_SLACK_MIB) * MIB  # the two largest buffers
    ok = empty and held >= expected and returned >= baseline - RELEASE_SLACK_MIB * MIB
    return Check("release", ok, f"held {held / MIB:.0f} MiB; after release free memory is "
                                f"{(returned - baseline) / MIB:+.0f} MiB from before")
