"""The GPU check's results: one record per part, the table and JSON they print as, and the exit code.

A part passes, fails, or is not run (only TensorRT, and only where it is not installed). Nothing
here touches a GPU, so it is tested on every CI machine.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sdrun.atomic import write_atomic

NO_GPU_EXIT = 2
FAILED_EXIT = 1


class Status(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not run"


@dataclasses.dataclass(frozen=True)
class Check:
    """One thing a part verified: its name, whether it held, and what was measured."""

    name: str
    passed: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class PartResult:
    name: str
    status: Status
    reason: str = ""  # why it failed or was not run
    checks: tuple[Check, ...] = ()
    measurements: dict = dataclasses.field(default_factory=dict)  # numbers for the JSON
    seconds: float = 0.0

    @classmethod
    def from_checks(cls, name: str, checks: list[Check], measurements: dict | None = None) -> "PartResult":
        failed = [c.name for c in checks if not c.passed]
        status = Status.FAILED if failed or not checks else Status.PASSED
        reason = f"failed: {', '.join(failed)}" if failed else ("" if checks else "no check ran")
        return cls(name, status, reason, tuple(checks), dict(measurements or {}))

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status.value, "reason": self.reason, "seconds": self.seconds,
                "checks": [dataclasses.asdict(c) for c in self.checks], "measurements": self.measurements}


def run_part(name: str, part: Callable[[], PartResult], log=print) -> PartResult:
    """Run one part, timed; an exception makes it a failed part with its reason (traceback on stderr)."""
    log(f"\n== {name}")
    started = time.perf_counter()
    try:
        result = part()
    except Exception as err:  # noqa: BLE001 - a check reports every failure as a failure and goes on
        traceback.print_exc(file=sys.stderr)
        result = PartResult(name, Status.FAILED, f"{type(err).__name__}: {error_text(err)}")
    return dataclasses.replace(result, name=name, seconds=round(time.perf_counter() - started, 2))


def error_text(err: Exception) -> str:
    message = getattr(err, "message", None)
    return " ".join((message() if callable(message) else str(err)).split())


def exit_code(gpu_present: bool, parts: list[PartResult]) -> int:
    """2 without a GPU (nothing was checked), 1 when any part failed, else 0 (a part not run is not a failure)."""
    if not gpu_present:
        return NO_GPU_EXIT
    return FAILED_EXIT if any(p.status is Status.FAILED for p in parts) else 0


def summary_table(parts: list[PartResult]) -> str:
    lines = ["| part | check | result | detail |", "|---|---|---|---|"]
    for part in parts:
        if part.status is Status.NOT_RUN or not part.checks:
            lines.append(f"| {part.name} | — | {part.status.value} | {part.reason} |")
        for check in part.checks:
            lines.append(f"| {part.name} | {check.name} | {'pass' if check.passed else 'FAIL'} | {check.detail} |")
    verdicts = ", ".join(f"{p.name}: {p.status.value} ({p.seconds:.1f} s)" for p in parts)
    return "\n".join(lines) + f"\n\n{verdicts}"


def write_report(path: Path, environment: dict, parts: list[PartResult], code: int) -> Path:
    """Everything the check found, as JSON at `path` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "exit_code": code, "parts": [p.to_dict() for p in parts]}
    text = json.dumps(report, indent=2, default=str) + "\n"
    write_atomic(path, lambda temp: temp.write_text(text))
    return path
