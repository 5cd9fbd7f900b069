"""`sdrun txt2img|img2img --profile DIR`: where the time and the memory of one run go.

The backend's own operator profile (ONNX Runtime's profiler; TensorRT's per-layer IProfiler) of every
component is merged into one Chrome trace, `DIR/trace.json` (one process row per component; open it in
chrome://tracing or https://ui.perfetto.dev), and summarised in `DIR/summary.json` and `DIR/summary.md`:
per component the time inside the backend's runs, its top operator types and nodes; the UNet's share
spent in attention, group norm and convolution; the time of each denoising step; the peak resident host
memory of each stage (and the device memory in use after it, with TensorRT).

Times are the backend's: a node's time is its kernel time as the profiler reports it, a component's time
the sum of its runs (ONNX Runtime's `model_run` events; TensorRT's layer times summed).
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sdrun.backends.base import StageTimer
from sdrun.bundle import write_json_atomic
from sdrun.errors import UserError
from sdrun.host_memory import GIB, peak_gib, restart_peak

TRACE_FILE = "trace.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
TOP = 10  # operator types and nodes listed per component
UNET_COMPONENTS = ("unet", "unet_step")
# Operator types of each named share of UNet time, as ONNX Runtime reports them (its fused kernels included)
# and as TensorRT's layer names (from the ONNX node names the exporter gives) contain them.
SHARES = {
    "attention": ({"Attention", "MultiHeadAttention", "Softmax", "GroupQueryAttention"}, ("attention", "softmax")),
    "group_norm": ({"GroupNormalization", "InstanceNormalization", "GroupNorm"}, ("group_norm", "groupnorm")),
    "convolution": ({"Conv", "ConvTranspose", "FusedConv", "NhwcConv"}, ("conv",)),
}


def profile_directory(path: Path) -> Path:
    """`path`, created; a UserError before any loading when it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the --profile directory {path}: {err.strerror}.",
                        fix="choose a writable directory") from None
    return path


class RunProfile:
    """Collects one run's memory per stage and denoising-step times; `write` adds the backend's profiles."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.host_peak_gib: dict[str, float] = {}
        self.device_used_gib: dict[str, float] = {}
        self.step_ends: list[float] = []
        self.denoise_start: float | None = None

    def measure(self, stage: str, call: Callable[[], object], device_used: Callable[[], int] | None = None):
        """`call()` with the host peak restarted before it; the stage keeps the highest peak of its calls."""
        restart_peak()
        result = call()
        self.host_peak_gib[stage] = max(self.host_peak_gib.get(stage, 0.0), peak_gib())
        if device_used is not None:
            self.device_used_gib[stage] = max(self.device_used_gib.get(stage, 0.0), device_used() / GIB)
        return result

    def watch(self, pipeline) -> None:
        """Measure every component call of `pipeline` (its timed runners' inner runners are wrapped)."""
        for name, timed in pipeline.runners.items():
            timed.runner = _MeasuredRunner(timed.runner, name, self)

    def on_step(self, progress: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        def step(done: int, total: int) -> None:
            self.step_ends.append(time.perf_counter())
            if progress:
                progress(done, total)
        return step

    def step_ms(self) -> list[float]:
        """Each denoising step's wall time: from the first UNet call, then between steps' ends."""
        if self.denoise_start is None:
            return []
        marks = [self.denoise_start, *self.step_ends]
        return [round((b - a) * 1e3, 3) for a, b in zip(marks, marks[1:])]

    def write(self, runners: Mapping[str, object], timer: StageTimer, load_seconds: float) -> Path:
        """Write the trace and the summaries; returns the markdown summary's path."""
        events = {name: runner.end_profile() for name, runner in runners.items() if hasattr(runner, "end_profile")}
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / TRACE_FILE, {"traceEvents": merged_trace(events)})
        summary = profile_summary(events, timer, self.step_ms(), self.host_peak_gib, self.device_used_gib,
                                  load_seconds)
        write_json_atomic(self.directory / SUMMARY_JSON, summary)
        (self.directory / SUMMARY_MD).write_text(summary_markdown(summary))
        return self.directory / SUMMARY_MD


class _MeasuredRunner:
    def __init__(self, runner, name: str, profile: RunProfile):
        self.runner, self.name, self.profile = runner, name, profile
        self.rebuild_hint = runner.rebuild_hint
        self.device_used = getattr(runner, "device_used_bytes", None)

    def run(self, feeds):
        if self.name in UNET_COMPONENTS and self.profile.denoise_start is None:
            self.profile.denoise_start = time.perf_counter()
        return self.profile.measure(self.name, lambda: self.runner.run(feeds), self.device_used)


def merged_trace(events: Mapping[str, Sequence[dict]]) -> list[dict]:
    """One Chrome trace: each component's events in a process of its own, named after it."""
    merged = []
    for pid, (name, component_events) in enumerate(events.items(), start=1):
        merged.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
        merged += [{**event, "pid": pid} for event in component_events]
    return merged


FENCES = ("_fence_before", "_fence_after")  # ONNX Runtime's synchronisation around each kernel, not its time


def node_events(events: Sequence[dict]) -> list[dict]:
    """Per-node kernel events (ONNX Runtime: `<node>_kernel_time` with its op type; TensorRT: one per layer)."""
    return [e for e in events if e.get("cat") == "Node" and e.get("ph") == "X" and not e["name"].endswith(FENCES)]


def _op_type(event: dict) -> str:
    """ONNX Runtime names the node's op type; TensorRT's layers fuse several ops and name none."""
    return event.get("args", {}).get("op_name", "TensorRT layer")


def run_ms(events: Sequence[dict]) -> float:
    """The component's time in the backend: its `model_run` events, else its node times summed."""
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return (sum(runs) if runs else sum(e["dur"] for e in node_events(events))) / 1e3


def _node_name(event: dict) -> str:
    return event["name"].removesuffix("_kernel_time")


def top_by(events: Sequence[dict], key: Callable[[dict], str], top: int = TOP) -> list[dict]:
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        totals[key(event)] += event["dur"] / 1e3
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:top]
    return [{"name": name, "ms": round(ms, 3), "share": round(ms / whole, 4)} for name, ms in ranked]


def unet_shares(events: Sequence[dict]) -> dict[str, float]:
    """The fraction of node time spent in each of SHARES (by op type, or by layer name for TensorRT)."""
    nodes = node_events(events)
    whole = sum(e["dur"] for e in nodes) or 1.0
    shares = {}
    for share, (ops, name_parts) in SHARES.items():
        matched = [e for e in nodes if _op_type(e) in ops
                   or "op_name" not in e.get("args", {}) and any(p in e["name"].lower() for p in name_parts)]
        shares[share] = round(sum(e["dur"] for e in matched) / whole, 4)
    return shares


def profile_summary(events: Mapping[str, Sequence[dict]], timer: StageTimer, step_ms: list[float],
                    host_peak_gib: Mapping[str, float], device_used_gib: Mapping[str, float],
                    load_seconds: float) -> dict:
    components = {}
    for name, component_events in events.items():
        nodes = node_events(component_events)
        components[name] = {"backend_ms": round(run_ms(component_events), 3),
                            "wall_ms": round(timer.seconds.get(f"graph:{name}", 0.0) * 1e3, 3),
                            "calls": timer.counts.get(f"graph:{name}", 0),
                            "top_op_types": top_by(nodes, _op_type),
                            "top_nodes": top_by(nodes, _node_name)}
    unet = next((n for n in UNET_COMPONENTS if n in events), None)
    return {"components": components,
            "unet": None if unet is None else {"component": unet, "shares": unet_shares(events[unet])},
            "denoising_step_ms": step_ms,
            "host_peak_gib": {k: round(v, 3) for k, v in host_peak_gib.items()},
            "device_used_gib": {k: round(v, 3) for k, v in device_used_gib.items()},
            "timing_table_ms": timing_table_ms(timer), "load_ms": round(load_seconds * 1e3, 3)}


def timing_table_ms(timer: StageTimer) -> dict[str, float]:
    """The stages of `sdrun`'s timing table, in ms."""
    stages = ("text_encoder", "vae_encoder", "denoise", "vae_decoder", "total")
    return {s: round(timer.seconds[s] * 1e3, 3) for s in stages if s in timer.seconds}


def summary_markdown(summary: dict) -> str:
    lines = ["# sdrun profile", "", "| component | calls | backend ms | wall ms |", "|---|---|---|---|"]
    lines += [f"| {n} | {c['calls']} | {c['backend_ms']:.2f} | {c['wall_ms']:.2f} |"
              for n, c in summary["components"].items()]
    if summary["unet"]:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in summary["unet"]["shares"].items())
        lines += ["", f"{summary['unet']['component']} node time: {shares}"]
    for name, component in summary["components"].items():
        lines += ["", f"## {name}", "", "| op type | ms | share |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['ms']:.3f} | {t['share']:.1%} |" for t in component["top_op_types"]]
        lines += ["", "| node | ms | share |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['ms']:.3f} | {t['share']:.1%} |" for t in component["top_nodes"]]
    steps = summary["denoising_step_ms"]
    lines += ["", "## denoising steps (ms)", "", ", ".join(f"{s:.2f}" for s in steps) or "none"]
    lines += ["", "## memory", "", "| stage | host peak GiB | device used GiB |", "|---|---|---|"]
    lines += [f"| {s} | {g:.3f} | {summary['device_used_gib'].get(s, float('nan')):.3f} |"
              for s, g in summary["host_peak_gib"].items()]
    return "\n".join(lines) + "\n"


def describe(path: Path) -> str:
    return f"profile written: {path.parent / TRACE_FILE} (Chrome trace), {path} (summary)"
