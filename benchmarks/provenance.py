"""Where a results file came from: commit, date, library versions, thread settings and machine load.

`started()` is taken before a run and `finished()` after it; every file under `benchmarks/results/`
carries the stamp `finished()` returns. Versions are read from package metadata, so stamping
imports nothing heavy; torch's thread count is read only when the run has imported torch.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import struct
import sys
import zlib
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "diffusers", "transformers")
THREAD_ENV_PREFIXES = ("OMP_", "MKL_")
THREAD_ENV_ALWAYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # listed even when unset (null)
CHANGED_PATHS_SHOWN = 20
PNG_KEYWORD = "sdcompile-provenance"  # tEXt chunk holding the stamp as JSON
GIT_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class Started:
    """What is known before a run: the code it runs, when it began, and how busy the machine was."""

    git: dict
    date_utc: str
    load_average: list[float] | None


def started(repository: Path = REPOSITORY) -> Started:
    return Started(git_state(repository), utc_now(), load_average())


def finished(start: Started, threads: int | None) -> dict:
    """The stamp: `start` plus versions, thread settings and the machine, with its load after the run."""
    return {"commit": start.git["commit"], "dirty": start.git["dirty"], "changed_paths": start.git["changed_paths"],
            "date_utc": start.date_utc, "finished_utc": utc_now(), "versions": library_versions(),
            "threads": thread_settings(threads),
            "machine": {**machine_facts(), "load_average_before": start.load_average,
                        "load_average_after": load_average()}}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- code ------------------------------------------------------------------------------------------------


def git_state(repository: Path) -> dict:
    """HEAD's 40-hex commit and whether the tree differs from it; commit "unknown" outside git."""
    commit = _git(repository, "rev-parse", "--verify", "HEAD")
    if commit is None or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return {"commit": "unknown", "dirty": None, "changed_paths": []}
    changed = (_git(repository, "status", "--porcelain") or "").splitlines()
    return {"commit": commit, "dirty": bool(changed), "changed_paths": changed[:CHANGED_PATHS_SHOWN]}


def _git(repository: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repository), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --- libraries -------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    """The loaded module's `__version__`, else the installed package's (None: neither); tensorrt only where
    the real package is importable."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        versions[name] = getattr(sys.modules.get(name), "__version__", None) or _installed_version(name)
    versions["tensorrt"] = tensorrt_version()
    return versions


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensorrt_version() -> str | None:
    """TensorRT's `__version__`; None where only its type stubs (a namespace package) or nothing is there."""
    module = sys.modules.get("tensorrt")
    if module is None:
        spec = importlib.util.find_spec("tensorrt")
        if spec is None or spec.origin is None:
            return None
        try:
            import tensorrt as module
        except ImportError:
            return None
    return getattr(module, "__version__", None)


# --- threads ---------------------------------------------------------------------------------------------


def thread_settings(threads: int | None) -> dict:
    """`--threads`, the intra-op threads each runtime used, and the OpenMP / MKL environment."""
    torch = sys.modules.get("torch")
    env = {name: os.environ.get(name) for name in THREAD_ENV_ALWAYS}
    env |= {k: v for k, v in sorted(os.environ.items()) if k.startswith(THREAD_ENV_PREFIXES)}
    return {"requested": threads,
            # ONNX Runtime's sessions get `--threads` when given; otherwise its default, one per physical core.
            "onnxruntime_intra_op": threads or physical_cores(),
            "onnxruntime_intra_op_from": "--threads" if threads else "onnxruntime default: one per physical core",
            "torch_intra_op": torch.get_num_threads() if torch else None,
            "env": env}


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux), else usable CPUs."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, cpu, package = set(), None, "0"
    for line in _cpuinfo_lines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu, package = int(value), "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and (allowed is None or cpu in allowed):
            cores.add((package, value))
    return len(cores) or usable_cores()


# --- machine ---------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    cpu, cores = cpu_model(), usable_cores()
    return {"slug": machine_slug(cpu, cores), "cpu": cpu, "cores": cores, "cpu_count": os.cpu_count(),
            "memory_total_mib": memory_total_mib(), "platform": platform.platform()}


def _cpuinfo_lines() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.is_file() else []


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what `platform` knows)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_total_mib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (AttributeError, ValueError, OSError):
        return None


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (None where the platform has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_slug(cpu: str, cores: int) -> str:
    """e.g. "linux-x86_64-amd-epyc-7b13-2c": lower case, words of the CPU name, no vendor marks."""
    words = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", cpu.lower())
    name = "-".join(re.findall(r"[a-z0-9]+", words)[:5])
    return f"{platform.system().lower()}-{platform.machine().lower()}-{name}-{cores}c"


# --- files ------------------------------------------------------------------------------------------------


def summary_lines(stamp: dict) -> list[str]:
    """The stamp for a markdown file: one line each for code, libraries, threads and machine."""
    state = {True: "dirty tree", False: "clean tree", None: "not a git checkout"}[stamp["dirty"]]
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in stamp["versions"].items())
    t, m = stamp["threads"], stamp["machine"]
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items() if v is not None) or "none set"
    return [f"- Commit `{stamp['commit']}` ({state}), started {stamp['date_utc']}, finished {stamp['finished_utc']}.",
            f"- Versions: {versions}.",
            f"- Threads: --threads {t['requested'] or 'not given'}; ONNX Runtime intra-op {t['onnxruntime_intra_op']} "
            f"({t['onnxruntime_intra_op_from']}); torch {t['torch_intra_op'] or 'not loaded'}; OMP/MKL env: {env}.",
            f"- Machine: {m['cpu']}, {m['cores']} usable cores of {m['cpu_count']}, "
            f"{_gib(m['memory_total_mib'])} memory, {m['platform']}; load average (1, 5, 15 min) "
            f"{_load(m['load_average_before'])} before the run, {_load(m['load_average_after'])} after."]


def _gib(mib: float | None) -> str:
    return f"{mib / 1024:.1f} GiB" if mib else "unknown"


def _load(values: list[float] | None) -> str:
    return "/".join(f"{x:g}" for x in values) if values else "unknown"


def stamp_png(path: Path, stamp: dict) -> None:
    """Add the stamp as a tEXt chunk (keyword PNG_KEYWORD, ASCII JSON) just before the PNG's IEND chunk."""
    data = path.read_bytes()
    end = data.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    body = PNG_KEYWORD.encode("latin-1") + b"\0" + json.dumps(stamp, sort_keys=True).encode("ascii")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    path.write_bytes(data[:end] + chunk + data[end:])
