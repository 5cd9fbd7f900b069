"""`python -m benchmarks` (`make bench`): accuracy and latency of every backend against eager PyTorch;
with `--export-only`, the time and peak memory of each component's export."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from benchmarks.config import PRECISIONS
from sdrun.errors import run_cli


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", default="tiny", show_default=True, help="recipe name or .toml path (random weights)")
@click.option("--steps", type=click.IntRange(min=1), help="DDIM steps (default: the recipe's)")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="timed runs per measurement")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="untimed runs before them")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True,
              help="directory for <machine>-<recipe>.json/.md/-latency.png/-images.png/-convergence.png "
                   "(--export-only: <machine>-<recipe>-export.json/.md)")
@click.option("--seed", type=int, default=0, show_default=True, help="random weights and initial noise")
@click.option("--threads", type=click.IntRange(min=1),
              help="intra-op threads for ONNX Runtime and eager PyTorch alike (default: each library's own)")
@click.option("--unet-step-only", is_flag=True,
              help="time one UNet call at batch 2 (eager, ONNX Runtime fp32/fp16, diffusers) instead of txt2img")
@click.option("--sampler-repeats", type=click.IntRange(min=0), default=3, show_default=True,
              help="timed runs per backend and sampler in the sampler table (0: no sampler table)")
@click.option("--no-convergence", is_flag=True,
              help="skip the convergence run (every sampler at 5-50 steps against 1000-step DDIM)")
@click.option("--export-only", is_flag=True,
              help="only export, each base component and all in its own process per precision, and report wall "
                   "time, peak RSS and peak / fp32 weights into <machine>-<recipe>-export.json/.md")
@click.option("--component", "components", multiple=True,
              help="with --export-only: a base component or all, repeatable (default: every base component and all)")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="with --export-only: repeatable (default: fp32 and fp16)")
@click.option("--serve-only", is_flag=True,
              help="only serve: `sdrun serve` throughput (requests/s, p50/p95) at 1, 4 and 8 clients with and "
                   "without batching, into <machine>-<recipe>-serve.json/.md")
def main(recipe, steps, repeats, warmup, out, seed, threads, unet_step_only, sampler_repeats, no_convergence,
         export_only, components, precisions, serve_only) -> None:
    """Export the recipe with random weights, run every available backend on the same prompts and noise,
    and report accuracy (per component and end to end) and latency. Exits 1 when an accuracy gate fails
    or a backend this machine has fails to build or run; a backend it lacks is listed as not run.
    With --export-only: exits 1 when an export fails; the peak / weights target is reported only."""
    if export_only:
        sys.exit(export_only_main(recipe, seed, components or None, precisions or PRECISIONS, out))
    if serve_only:
        sys.exit(serve_only_main(recipe, seed, steps, threads, out))
    from benchmarks import provenance
    from benchmarks.config import BenchConfig, Scope
    from benchmarks.harness import BackendFailure, run_benchmark
    from benchmarks.report import write_results

    config = BenchConfig(recipe=recipe, scope=Scope.UNET_STEP if unet_step_only else Scope.PIPELINE, steps=steps,
                         repeats=repeats, warmup=warmup, seed=seed, threads=threads, sampler_repeats=sampler_repeats,
                         **({"convergence_steps": ()} if no_convergence else {}))
    started = provenance.started()
    try:
        result = run_benchmark(config, log=click.echo)
    except BackendFailure as failure:
        click.echo(f"benchmark FAILED: {failure}", err=True)
        sys.exit(1)
    paths = write_results(result, out, started, log=click.echo)
    click.echo("\n" + paths["markdown"].read_text())
    sys.exit(1 if result.failed_gates else 0)


def export_only_main(recipe: str, seed: int, components: tuple[str, ...] | None, precisions: tuple[str, ...],
                     out: Path) -> int:
    """The export-memory benchmark; its exit status (1: an export failed)."""
    from benchmarks import provenance
    from benchmarks.config import ExportBenchConfig
    from benchmarks.export_memory import export_memory_benchmark
    from benchmarks.export_memory_report import write_results

    config = ExportBenchConfig(recipe=recipe, seed=seed, components=components, precisions=tuple(precisions))
    started = provenance.started()
    result = export_memory_benchmark(config, log=click.echo)
    paths = write_results(result, out, started, log=click.echo)
    click.echo("\n" + paths["markdown"].read_text())
    return 1 if result.failed else 0


SERVE_STEPS = 10  # per request, when --steps is not given


def serve_only_main(recipe: str, seed: int, steps: int | None, threads: int | None, out: Path) -> int:
    """The serving benchmark on a random-weight bundle of `recipe`, exported first."""
    import tempfile

    from benchmarks import provenance
    from benchmarks.exports import export_measured
    from benchmarks.serve_throughput import serve_benchmark, write_serve_results

    started = provenance.started()
    steps = steps or SERVE_STEPS
    with tempfile.TemporaryDirectory(prefix="sdcompile-bench-serve-") as scratch:
        bundle = Path(scratch) / "bundle"
        export_measured(recipe, "fp32", bundle, seed, log=lambda line: None)
        rows = serve_benchmark(bundle, steps, threads, log=click.echo)
    paths = write_serve_results(rows, recipe, steps, threads, out, started, log=click.echo)
    click.echo("\n" + paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
