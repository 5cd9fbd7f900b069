"""Export-memory results as `<machine>-<recipe>-export.json` and `.md`, stamped with their provenance.

The peak / weights target is reported, never asserted; a failed export is listed as FAILED.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import provenance
from benchmarks.export_memory import PEAK_OVER_WEIGHTS_TARGET, ExportMemoryResult, ExportMemoryRow
from benchmarks.report import finite_json, table

GIB = 2**30


def result_dict(result: ExportMemoryResult, stamp: dict) -> dict:
    config = result.config
    return {"provenance": stamp, "recipe": config.recipe, "seed": config.seed, "precisions": list(config.precisions),
            "target": {"statistic": "peak RSS / fp32 weight bytes", "relation": "<=",
                       "value": PEAK_OVER_WEIGHTS_TARGET},
            "rows": [row.to_dict() for row in result.rows], "passed": not result.failed}


def markdown(result: ExportMemoryResult, stamp: dict) -> str:
    config = result.config
    head = [f"# sdcompile export memory: {config.recipe}", "",
            f"Machine `{stamp['machine']['slug']}`. One `sdcompile export --random-weights --seed {config.seed} "
            "--component NAME` process per row; peak RSS is the process's maximum resident set size "
            "(interpreter and torch included); fp32 weights are the parameters the exported graphs hold, "
            f"numel × 4 bytes. Target (reported, not asserted): peak / weights ≤ {PEAK_OVER_WEIGHTS_TARGET:g}."]
    sections = ["## Provenance\n\n" + "\n".join(provenance.summary_lines(stamp)), exports_table(result),
                phases_table(result), failures_text(result)]
    return "\n\n".join(["\n".join(head), *[s for s in sections if s]]) + "\n"


def exports_table(result: ExportMemoryResult) -> str:
    rows = [[r.component, r.precision, *_measured_cells(r), f"{r.fp32_weight_bytes / GIB:.3f}",
             _ratio(r.peak_over_weights), _target_cell(r)] for r in result.rows]
    return "## Exports\n\n" + table(["component", "precision", "wall s", "peak RSS GiB", "fp32 weights GiB",
                                     "peak / weights", f"target ≤ {PEAK_OVER_WEIGHTS_TARGET:g}"], rows)


def phases_table(result: ExportMemoryResult) -> str:
    """Every phase line the export logs printed: wall seconds, resident GiB when it ended, peak GiB so far."""
    rows = [[f"{r.component} {r.precision}", p.component, p.phase, f"{p.seconds:.1f}", f"{p.resident_gib:.1f}",
             "" if p.peak_gib is None else f"{p.peak_gib:.1f}"]
            for r in result.rows if r.export for p in r.export.phases]
    return "## Phases (from the export logs)\n\n" + table(
        ["export", "component", "phase", "s", "resident GiB after", "peak GiB so far"], rows) if rows else ""


def failures_text(result: ExportMemoryResult) -> str:
    if not result.failed:
        return f"All {len(result.rows)} exports succeeded."
    return f"{len(result.failed)} of {len(result.rows)} exports FAILED:\n\n" + "\n\n".join(
        f"- {r.component} {r.precision}:\n\n```\n{r.error}\n```" for r in result.failed)


def _measured_cells(row: ExportMemoryRow) -> list[str]:
    if row.export is None:
        return ["FAILED", "n/a"]
    peak = row.export.peak_rss_mib
    return [f"{row.export.seconds:.1f}", f"{peak / 1024:.2f}" if peak else "n/a"]


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _target_cell(row: ExportMemoryRow) -> str:
    return {True: "met", False: "missed", None: "n/a"}[row.target_met]


def write_results(result: ExportMemoryResult, out: Path, started: provenance.Started, log=print) -> dict[str, Path]:
    """`<machine>-<recipe>-export.json` and `.md` under `out`; returns their paths."""
    from sdrun.bundle import write_json_atomic

    stamp = provenance.finished(started, None)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stamp['machine']['slug']}-{result.config.recipe}-export"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    write_json_atomic(paths["json"], finite_json(result_dict(result, stamp)))
    paths["markdown"].write_text(markdown(result, stamp))
    for kind, path in paths.items():
        log(f"wrote {kind}: {path}")
    return paths
