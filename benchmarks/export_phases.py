"""The per-phase lines of an `sdcompile export` log, as records.

The export logs each phase of each component as
`[unet] traced (opset 23): 12.3 s, 4.1 GiB resident (peak 4.2 GiB)`: the phase's wall time, the
process's resident set size when it ended and its peak so far. Other lines (gates, progress) are not
phases.
"""
from __future__ import annotations

import dataclasses
import re

PHASE_LINE = re.compile(r"^\[(?P<component>[^\]]+)\] (?P<phase>.+): (?P<seconds>[0-9.]+) s, "
                        r"(?P<resident_gib>[0-9.]+) GiB resident(?: \(peak (?P<peak_gib>[0-9.]+) GiB\))?$")


@dataclasses.dataclass(frozen=True)
class ExportPhase:
    component: str
    phase: str  # "traced (opset 23)", "passes cleanup, fuse-attention", "saved", "verified", ...
    seconds: float  # wall time of this phase alone
    resident_gib: float  # the export process's RSS when the phase ended (GiB, 2**30 bytes)
    peak_gib: float | None = None  # its peak RSS up to then (None: a log from before the peak was logged)


def phases_from_log(lines: list[str]) -> tuple[ExportPhase, ...]:
    """Every phase line of the log, in order."""
    found = (PHASE_LINE.match(line.strip()) for line in lines)
    return tuple(ExportPhase(m["component"], m["phase"], float(m["seconds"]), float(m["resident_gib"]),
                             float(m["peak_gib"]) if m["peak_gib"] else None)
                 for m in found if m)
