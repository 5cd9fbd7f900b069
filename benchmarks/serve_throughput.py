"""Throughput of `sdrun serve`: requests/s and p50/p95 latency at several client concurrencies, with the
loop batcher on and off, one real server per mode on 127.0.0.1 (`--serve-only`).

Every request asks the same size, steps and sampler (each its own prompt and seed), so with batching
concurrent requests share a loop; without it (`--max-batch 1`) each runs alone.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import provenance
from benchmarks.report import finite_json, table
from benchmarks.server_process import running_server

CONCURRENCY = (1, 4, 8)
REQUESTS_PER_CLIENT = 4
MODES = {"batching": ("--max-queue-delay-ms", "5"), "no batching": ("--max-batch", "1", "--max-queue-delay-ms", "0")}
TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class ServeRow:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    latencies_s: tuple[float, ...]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "concurrency": self.concurrency, "requests": self.requests,
                "seconds": self.seconds, "requests_per_s": self.requests_per_s, "p50_ms": self.percentile_ms(50),
                "p95_ms": self.percentile_ms(95)}


def serve_benchmark(bundle: Path, steps: int, threads: int | None, log=print) -> list[ServeRow]:
    from sdrun.serve.client import remote_generate, request_tensors

    rows = []
    extra = ("--threads", str(threads)) if threads else ()
    for mode, options in MODES.items():
        with tempfile.TemporaryDirectory() as scratch, \
                running_server(bundle, Path(scratch) / "serve.log", *options, *extra) as server:
            def one(index: int) -> float:
                start = time.perf_counter()
                remote_generate(server.url, "txt2img", request_tensors(
                    "txt2img", {"prompt": f"a lighthouse number {index}", "seed": index, "steps": steps}), TIMEOUT_S)
                return time.perf_counter() - start

            one(0)  # warm-up: sessions' first run
            for concurrency in CONCURRENCY:
                count = concurrency * REQUESTS_PER_CLIENT
                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    latencies = tuple(pool.map(one, range(count)))
                row = ServeRow(mode, concurrency, count, time.perf_counter() - start, latencies)
                log(f"  {mode}, {concurrency} clients: {row.requests_per_s:.2f} requests/s, "
                    f"p50 {row.percentile_ms(50):.0f} ms, p95 {row.percentile_ms(95):.0f} ms")
                rows.append(row)
    return rows


def write_serve_results(rows: list[ServeRow], recipe: str, steps: int, threads: int | None, out: Path,
                        started: provenance.Started, log=print) -> dict[str, Path]:
    from sdrun.bundle import write_json_atomic

    stamp = provenance.finished(started, threads)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stamp['machine']['slug']}-{recipe}-serve"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    write_json_atomic(paths["json"], finite_json({"provenance": stamp, "recipe": recipe, "steps": steps,
                                                  "rows": [r.to_dict() for r in rows]}))
    by_mode = {(r.mode, r.concurrency): r for r in rows}
    body = table(["mode", "clients", "requests", "requests/s", "p50 ms", "p95 ms", "vs no batching"],
                 [[r.mode, str(r.concurrency), str(r.requests), f"{r.requests_per_s:.2f}",
                   f"{r.percentile_ms(50):.0f}", f"{r.percentile_ms(95):.0f}",
                   f"{r.requests_per_s / by_mode['no batching', r.concurrency].requests_per_s:.2f}×"]
                  for r in rows])
    paths["markdown"].write_text("\n\n".join([
        f"# sdrun serve throughput: {recipe}",
        f"Machine `{stamp['machine']['slug']}`. `sdrun serve` (ONNX Runtime) on 127.0.0.1, txt2img at the recipe's "
        f"default size, {steps} steps, DDIM; {REQUESTS_PER_CLIENT} requests per client over HTTP after one warm-up; "
        f"batching: `{' '.join(MODES['batching'])}`, no batching: `{' '.join(MODES['no batching'])}`.",
        "## Provenance\n\n" + "\n".join(provenance.summary_lines(stamp)), "## Throughput\n\n" + body]) + "\n")
    for kind, path in paths.items():
        log(f"wrote {kind}: {path}")
    return paths
