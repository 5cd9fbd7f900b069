"""Export memory: each base component, and all of them, exported alone in its own process.

For every precision, one `sdcompile export --component NAME` per base component of the recipe
(derived components such as unet_step come from their base's graph, so `--component unet` stands
for them) and one `--component all`, each timed with its peak resident memory
(`benchmarks.exports`). Set against the fp32 bytes of the weights that export holds
(`benchmarks.weight_bytes`), the peak says how many copies of the weights the export keeps alive
at once. A failed export is recorded with its error and fails the run.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks.config import ExportBenchConfig
from benchmarks.exports import ExportMeasurement, export_measured
from benchmarks.weight_bytes import fp32_weight_bytes
from sdrun.errors import UserError

ALL = "all"
PEAK_OVER_WEIGHTS_TARGET = 1.5  # peak RSS of one export process / fp32 bytes of the weights it exports


@dataclasses.dataclass(frozen=True)
class ExportMemoryRow:
    component: str  # a base component, or "all"
    precision: str
    fp32_weight_bytes: int  # parameters the exported graph(s) hold, numel × 4
    export: ExportMeasurement | None  # None when the export failed
    error: str | None = None  # why it failed

    @property
    def peak_over_weights(self) -> float | None:
        if self.export is None or self.export.peak_rss_mib is None:
            return None
        return self.export.peak_rss_mib * 2**20 / self.fp32_weight_bytes

    @property
    def target_met(self) -> bool | None:
        ratio = self.peak_over_weights
        return None if ratio is None else ratio <= PEAK_OVER_WEIGHTS_TARGET

    def to_dict(self) -> dict:
        return {"component": self.component, "precision": self.precision,
                "fp32_weight_bytes": self.fp32_weight_bytes,
                "export": self.export.to_dict() if self.export else None, "error": self.error,
                "peak_over_weights": self.peak_over_weights, "target_met": self.target_met}


@dataclasses.dataclass(frozen=True)
class ExportMemoryResult:
    config: ExportBenchConfig
    rows: tuple[ExportMemoryRow, ...]

    @property
    def failed(self) -> list[ExportMemoryRow]:
        return [row for row in self.rows if row.error is not None]


def base_components(recipe) -> list[str]:
    """The registry's components that are traced, not derived from another's graph, in registry order."""
    from sdcompile.components import component_spec, recipe_component_names

    return [name for name in recipe_component_names(recipe) if component_spec(name, recipe).derived_from is None]


def export_targets(requested: tuple[str, ...] | None, bases: list[str]) -> list[str]:
    """`requested` in registry order, "all" last (None: every base component and all)."""
    if requested is None:
        return [*bases, ALL]
    unknown = [name for name in requested if name not in (*bases, ALL)]
    if unknown:
        raise UserError(f"cannot measure the export of {', '.join(map(repr, unknown))} on its own.",
                        expected=" | ".join([*bases, ALL]), got=", ".join(requested),
                        fix="name base components; a derived one (unet_step) is exported from its base's graph")
    return [name for name in (*bases, ALL) if name in requested]


def export_memory_benchmark(config: ExportBenchConfig, log: Callable[[str], None] = print) -> ExportMemoryResult:
    """Every (precision, component) export in its own process, each beside its fp32 weight bytes."""
    from sdcompile.recipes import load_recipe

    recipe = load_recipe(config.recipe)
    bases = base_components(recipe)
    targets = export_targets(config.components, bases)
    weights = fp32_weight_bytes(recipe, bases, config.seed, log)
    rows = [measured_row(config, precision, name, weights[name], log)
            for precision in config.precisions for name in targets]
    return ExportMemoryResult(config, tuple(rows))


def measured_row(config: ExportBenchConfig, precision: str, component: str, weight_bytes: int,
                 log: Callable[[str], None]) -> ExportMemoryRow:
    """One export into a scratch directory removed afterwards; a failure is kept as the row's error."""
    with tempfile.TemporaryDirectory(prefix="sdcompile-bench-export-") as scratch:
        try:
            export = export_measured(config.recipe, precision, Path(scratch) / "bundle", config.seed, (component,),
                                     log)
        except UserError as err:
            log(f"export {component} {precision} FAILED: {err}")
            return ExportMemoryRow(component, precision, weight_bytes, None, str(err))
    peak = f", peak RSS {export.peak_rss_mib / 1024:.2f} GiB" if export.peak_rss_mib else ""
    log(f"export {component} {precision}: {export.seconds:.1f} s{peak}")
    return ExportMemoryRow(component, precision, weight_bytes, export)
