"""PNG charts: latency per backend stacked by stage, the images side by side with their PSNR, and the
samplers' convergence curves.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.config import Scope
from benchmarks.outcome import BenchResult
from sdrun.errors import MissingDependencyError

STAGE_COLOURS = {"text_encoder": "#4c72b0", "denoise": "#dd8452", "vae_decoder": "#55a868", "overhead": "#8c8c8c",
                 "unet": "#dd8452"}
STAGE_NAMES = {"text_encoder": "text encoder", "denoise": "denoise (graph calls)", "vae_decoder": "VAE decoder",
               "overhead": "runtime overhead", "unet": "one UNet call", "peer": "end to end"}
PIPELINE_STAGES = ("text_encoder", "denoise", "vae_decoder", "overhead")  # they add up to the total
PEER_COLOUR = "#c44e52"
BAR_HEIGHT_INCHES = 0.45


def curve_colour(index: int):
    """20 distinct colours (matplotlib's tab20), one per convergence curve."""
    from matplotlib import colormaps

    return colormaps["tab20"](index)


def new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "for the benchmark charts",
                                     "pip install 'sdcompile[test]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def latency_chart(result: BenchResult, path: Path) -> None:
    """Horizontal bars of median milliseconds: per variant stacked by stage, or per runner for one UNet step."""
    if result.config.scope is Scope.UNET_STEP:
        bars = {r.label: {"unet": r.latency.median_ms} for r in result.unet_step}
        title = f"{result.config.recipe}: one UNet step (median ms)"
    else:
        bars = {v.variant.label: {s: v.latency.stages[s].median_ms for s in PIPELINE_STAGES} for v in result.variants}
        if result.peer:
            bars["diffusers (eager fp32)"] = {"peer": result.peer.latency.median_ms}
        title = f"{result.config.recipe}: txt2img, {result.steps} steps (median ms)"
    figure = new_figure(10, 1.2 + BAR_HEIGHT_INCHES * len(bars))
    axes = figure.add_subplot()
    labels = list(bars)[::-1]  # first variant on top
    left = np.zeros(len(labels))
    for stage in _stages_in(bars):
        widths = np.array([bars[label].get(stage, 0.0) for label in labels])
        axes.barh(labels, widths, left=left, color=STAGE_COLOURS.get(stage, PEER_COLOUR), label=STAGE_NAMES[stage])
        left += widths
    for y, total in enumerate(left):
        axes.text(total, y, f" {total:.1f}", va="center", fontsize=8)
    axes.set_xlabel("milliseconds")
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.set_xlim(0, left.max() * 1.15)
    figure.savefig(path, dpi=110)


def _stages_in(bars: dict) -> list[str]:
    seen = []
    for stages in bars.values():
        seen += [s for s in stages if s not in seen]
    return seen


def image_grid(result: BenchResult, path: Path) -> None:
    """One row per prompt: the reference, every other variant and the peer, each with its PSNR vs the reference."""
    from sdrun.metrics import psnr

    reference = result.reference_images
    columns = [("reference\n(eager fp32)", reference)]
    columns += [(v.variant.label.replace(" ", "\n", 1), v.images) for v in result.variants
                if not v.variant.is_reference]
    if result.peer:
        columns.append(("diffusers\n(eager fp32)", result.peer.images))
    figure = new_figure(1.5 * len(columns), 1.9 * len(reference))
    grid = figure.subplots(len(reference), len(columns), squeeze=False)
    for column, (title, images) in enumerate(columns):
        for row, image in enumerate(images):
            axes = grid[row][column]
            axes.imshow(image, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(title, fontsize=7)
            if column:
                axes.set_xlabel(_psnr_label(psnr(reference[row], image, 255.0)), fontsize=7)
    figure.savefig(path, dpi=110)


def _psnr_label(psnr_db: float) -> str:
    return "identical" if psnr_db == float("inf") else f"PSNR {psnr_db:.1f} dB"


def convergence_chart(convergence, title: str, path: Path) -> None:
    """One line per sampler: relative L2 to the target solution (log scale) against steps; stochastic
    samplers dashed, since they converge to another distribution rather than to the ODE solution."""
    figure = new_figure(9, 5.5)
    axes = figure.add_subplot()
    colours = [curve_colour(i % 20) for i in range(len(convergence.curves))]
    for curve, colour in zip(convergence.curves, colours):
        axes.plot(curve.steps, curve.distances, marker="o", markersize=3, color=colour,
                  linestyle="--" if curve.stochastic else "-",
                  label=curve.label + (" (stochastic)" if curve.stochastic else ""))
    axes.set_yscale("log")
    axes.set_xlabel("steps")
    axes.set_ylabel("relative L2 of final latents")
    axes.set_title(f"{title} ({convergence.model})\ndashed: stochastic samplers (fresh noise each step),\n"
                   "which converge to another distribution, not to the ODE solution", fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.savefig(path, dpi=110)
