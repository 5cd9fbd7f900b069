"""The process's memory: reading resident and peak sizes, and handing freed memory back so the next
phase's peak starts from what is really alive."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path


def return_freed_memory() -> None:
    """Collect what was freed and hand glibc's freed heap pages back to the system (`malloc_trim`;
    elsewhere nothing to do)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_gib() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def peak_gib() -> float:
    """The process's peak resident set size so far (getrusage: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20
