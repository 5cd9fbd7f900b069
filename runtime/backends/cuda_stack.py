"""Which CUDA this machine's driver supports, which CUDA the installed packages are built for, and
which `sdcompile` extra fits.

TensorRT and CUDA Python ship one wheel per CUDA major; a driver runs code built for its own CUDA
major or an older one, never a newer one. An unpinned `cuda-bindings` resolves to the newest major,
so on a CUDA-12 driver it made TensorRT look unavailable; the extras pin both to one major
(`pyproject.toml`, kept equal to `EXTRAS` by a test). The driver is asked through `libcuda`
with ctypes, so the answer comes even when CUDA Python is missing or built for a newer CUDA.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import sys

LIBCUDA = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
CUDA_SUCCESS = 0
NVIDIA_INDEX_NOTE = ("TensorRT's wheels download their libraries from NVIDIA's package index at install time; "
                     "if that step fails, add --extra-index-url https://pypi.nvidia.com")


@dataclasses.dataclass(frozen=True)
class Extra:
    """One `sdcompile[...]` extra: TensorRT and the CUDA Python it is pinned with, for one CUDA major."""

    cuda_major: int
    name: str  # the extra, e.g. "tensorrt-cu12"
    tensorrt: str  # the TensorRT distribution it installs
    cuda_bindings: str  # the cuda-bindings requirement it pins

    @property
    def install(self) -> str:
        return f"sdcompile[{self.name}]"


EXTRAS = {
    12: Extra(12, "tensorrt-cu12", "tensorrt-cu12", "cuda-bindings>=12.8,<13"),
    13: Extra(13, "tensorrt-cu13", "tensorrt-cu13", "cuda-bindings>=13,<14"),
}


@dataclasses.dataclass(frozen=True)
class DriverInfo:
    """What the NVIDIA driver says: the newest CUDA it supports and how many devices it sees."""

    cuda_version: int | None  # cuDriverGetVersion: 1000 * major + 10 * minor (12040 is 12.4); None: no driver
    device_count: int = 0
    problem: str | None = None  # why no device is usable, when none is

    @property
    def description(self) -> str:
        if self.cuda_version is None:
            return "no NVIDIA driver"
        return f"NVIDIA driver for CUDA {cuda_version_text(self.cuda_version)}, {self.device_count} device(s)"


@dataclasses.dataclass(frozen=True)
class CudaPackage:
    """An installed distribution built for one CUDA major."""

    name: str
    version: str
    cuda_major: int


def cuda_version_text(version: int) -> str:
    """12040 -> "12.4" (the encoding of cuDriverGetVersion and cudaDriverGetVersion)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def extra_for_driver(cuda_version: int | None) -> str | None:
    """The extra for the newest CUDA major the driver runs: 12040 -> "sdcompile[tensorrt-cu12]"; None when
    the driver is unknown or older than every extra."""
    if cuda_version is None:
        return None
    fitting = [major for major in EXTRAS if major <= cuda_version // 1000]
    return EXTRAS[max(fitting)].install if fitting else None


def install_hint(driver: DriverInfo) -> str:
    """The pip command that installs TensorRT and CUDA Python for this driver."""
    if driver.cuda_version is None:
        choices = ", ".join(f"'{e.install}' on a CUDA {e.cuda_major} driver" for e in reversed(EXTRAS.values()))
        return f"pip install {choices} (`nvidia-smi` shows the driver's CUDA; none was found here)   " \
               f"({NVIDIA_INDEX_NOTE})"
    text = cuda_version_text(driver.cuda_version)
    extra = extra_for_driver(driver.cuda_version)
    if extra is None:
        oldest = EXTRAS[min(EXTRAS)]
        return (f"upgrade the NVIDIA driver (it supports CUDA {text}; TensorRT needs CUDA {oldest.cuda_major} or "
                f"newer), then pip install '{oldest.install}'   ({NVIDIA_INDEX_NOTE})")
    return f"pip install '{extra}'   (this machine's driver supports CUDA {text}; {NVIDIA_INDEX_NOTE})"


def cuda_bindings_hint(driver: DriverInfo) -> str:
    """The pip command for CUDA Python alone, pinned to the driver's CUDA major when it is known."""
    extra = extra_for_driver(driver.cuda_version)
    if extra is None:
        return install_hint(driver)
    pinned = next(e for e in EXTRAS.values() if e.install == extra)
    return (f"pip install '{extra}'   (this machine's driver supports CUDA {cuda_version_text(driver.cuda_version)}; "
            f"or only CUDA Python: pip install '{pinned.cuda_bindings}')")


def stack_problems(cuda_version: int | None, packages: list[CudaPackage]) -> list[str]:
    """Installed packages built for a newer CUDA than the driver supports (they fail to initialize)."""
    if cuda_version is None:
        return []
    major = cuda_version // 1000
    return [f"{p.name} {p.version} is built for CUDA {p.cuda_major}, and this machine's driver supports only "
            f"CUDA {cuda_version_text(cuda_version)}" for p in packages if p.cuda_major > major]


def stack_fix(driver: DriverInfo) -> str:
    extra = extra_for_driver(driver.cuda_version)
    target = f"pip install --force-reinstall '{extra}' (it pins TensorRT and cuda-bindings to the driver's CUDA)" \
        if extra else install_hint(driver)
    return f"{target}, or upgrade the NVIDIA driver"


def installed_cuda_packages() -> list[CudaPackage]:
    """cuda-bindings (or the older cuda-python) and the TensorRT wheels, with the CUDA major each is built for."""
    found = []
    for name in ("cuda-bindings", "cuda-python"):
        version = _version(name)
        if version is not None and version.split(".")[0].isdigit():
            found.append(CudaPackage(name, version, int(version.split(".")[0])))
            break
    for extra in EXTRAS.values():
        for name in (extra.tensorrt, f"{extra.tensorrt}-libs", f"{extra.tensorrt}-bindings"):
            version = _version(name)
            if version is not None:
                found.append(CudaPackage(name, version, extra.cuda_major))
                break
    return found


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def read_driver() -> DriverInfo:
    """Ask libcuda (driver API, through ctypes) for its CUDA version and device count, once per process."""
    try:
        lib = ctypes.CDLL(LIBCUDA)
    except OSError:
        return DriverInfo(None, 0, f"no NVIDIA driver ({LIBCUDA} cannot be loaded)")
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != CUDA_SUCCESS:
        return DriverInfo(None, 0, f"the NVIDIA driver ({LIBCUDA}) does not report its CUDA version")
    status = lib.cuInit(0)
    if status != CUDA_SUCCESS:
        return DriverInfo(version.value, 0, f"the driver sees no usable CUDA device (cuInit returned CUDA error "
                                            f"{status}; check CUDA_VISIBLE_DEVICES and nvidia-smi)")
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS or count.value == 0:
        return DriverInfo(version.value, 0, "the driver sees no CUDA device (check CUDA_VISIBLE_DEVICES)")
    return DriverInfo(version.value, count.value)
