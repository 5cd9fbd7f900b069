"""The process's host memory: resident and peak resident set sizes, and a peak that can be restarted.

Linux reads /proc/self/status (VmRSS, VmHWM); writing 5 to /proc/self/clear_refs restarts VmHWM at the
current size (Linux >= 4.0, proc(5)), so one stage's peak can be told from an earlier stage's.
Elsewhere the resident size reads 0 and the peak is getrusage's, which cannot be restarted.
"""
from __future__ import annotations

import sys
from pathlib import Path

GIB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_gib() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    return (_status_kib("VmRSS") or 0) / 2**20


def peak_gib() -> float:
    """The peak resident set size since the process started or `restart_peak` last succeeded."""
    high_water = _status_kib("VmHWM")
    if high_water is not None:
        return high_water / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / GIB if sys.platform == "darwin" else peak / 2**20


def restart_peak() -> bool:
    """Start the peak again from the current resident size; False where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
