"""Bundles for a benchmark: `sdcompile export` run as a child process, timed, with its peak memory
and the phases its log reports.

Each export is its own process, so its peak resident set size (getrusage's ru_maxrss, read with
`os.wait4` for exactly that child) is the memory one export needs, interpreter and torch included.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.export_phases import ExportPhase, phases_from_log
from sdrun.bundle import read_manifest
from sdrun.errors import UserError

LOG_TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class ExportMeasurement:
    precision: str
    seconds: float  # wall time of the `sdcompile export` process: load weights, trace, passes, verify, write
    peak_rss_mib: float | None  # None where the platform reports no child rusage
    component_seconds: dict[str, float]  # trace + passes per component (the manifest's export_seconds)
    phases: tuple[ExportPhase, ...] = ()  # the log's phase lines: seconds and resident GiB after each

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def export_command(recipe: str, precision: str, out: Path, seed: int, components: tuple[str, ...]) -> list[str]:
    """The `sdcompile export` command line, run with this interpreter."""
    selected = [arg for name in components for arg in ("--component", name)]
    return [sys.executable, "-c", "from sdcompile.cli import main; main()", "export", "--recipe", recipe,
            "--random-weights", "--seed", str(seed), "--out", str(out), "--precision", precision, "--force",
            *selected]


def export_measured(recipe: str, precision: str, out: Path, seed: int, components: tuple[str, ...] = ("all",),
                    log: Callable[[str], None] = print) -> ExportMeasurement:
    """Export a random-weight bundle in a child process; its wall time and peak memory."""
    command = export_command(recipe, precision, out, seed, components)
    log(f"exporting {recipe} {precision} into {out}")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        log(f"  {lines[-1]}")
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise UserError(f"`sdcompile export --recipe {recipe} --precision {precision}` failed "
                        f"(exit {process.returncode}).", got="\n".join(lines[-LOG_TAIL_LINES:]),
                        fix="run the export command above by hand to see the whole log")
    manifest = read_manifest(out)
    return ExportMeasurement(precision, seconds, peak_rss_mib(usage.ru_maxrss),
                             {name: float(record.report.get("export_seconds", float("nan")))
                              for name, record in manifest.components.items()}, phases_from_log(lines))


def peak_rss_mib(ru_maxrss: int) -> float | None:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    if ru_maxrss <= 0:
        return None
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 2**10
