"""`python -m benchmarks.shapes.bench` (`make bench-shapes`): meaning and fp16 accuracy of the trained tiny-shapes.

Exports fp32 and fp16 bundles from the committed weights through the public CLI, generates the prompt set
of `benchmarks.shapes.meaning` on each (ONNX Runtime, the recipe's default sampler) and writes
`<machine>-tiny-shapes-meaning.{md,json}`: colour, background and shape accuracy with confusion tables at
the recipe's guidance and at guidance 1, on the fp16 bundle, for img2img from the generated images, and
for every sampler; and fp16 vs fp32 image PSNR.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from benchmarks import provenance
from benchmarks.shapes import meaning

REPOSITORY = Path(__file__).resolve().parents[2]
WEIGHTS = REPOSITORY / "recipes" / "weights" / "tiny-shapes.safetensors"
PRECISIONS = ("fp32", "fp16")
IMG2IMG_STRENGTH = 0.6
SAMPLER_SEEDS = (0,)  # every sampler on the 36 prompts once


def export_bundle(weights: Path, precision: str, out: Path) -> Path:
    """The tiny-shapes bundle of `weights` at `precision`, through `sdcompile export` (verified)."""
    command = [sys.executable, "-c", "from sdcompile.cli import main; main()", "export", "--recipe", "tiny-shapes", "--checkpoint",
               str(weights), "--precision", precision, "--component", "all", "--out", str(out), "--force"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def load(bundle: Path, threads: int | None):
    from sdrun.backends import BackendOptions
    from sdrun.session import load_pipeline

    return load_pipeline(bundle, "onnxruntime", step_fusion=False, img2img=True,
                         options=BackendOptions(threads=threads)).pipeline


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    score: meaning.Score
    seconds: float


def timed_run(label: str, pipeline, asked, log, **options) -> tuple[Run, np.ndarray]:
    start = time.perf_counter()
    images = meaning.generate(pipeline, asked, **options)
    run = Run(label, meaning.Score.of(asked, images), time.perf_counter() - start)
    log(f"{label}: colour {run.score.accuracy('colour'):.1%}, background {run.score.accuracy('background'):.1%} "
        f"({run.seconds:.1f} s)")
    return run, images


def image_psnr(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """(N,) dB per image of two (N, H, W, 3) uint8 sets (inf where identical)."""
    from sdrun.metrics import psnr

    return np.array([psnr(r, c, 255.0) for r, c in zip(reference, candidate)])


def runs(pipelines: dict, log) -> tuple[list[Run], np.ndarray]:
    """Every run of the module docstring, and the fp16-vs-fp32 PSNR per image (dB)."""
    from sdrun.samplers.registry import SAMPLERS

    asked = meaning.cases()
    default, images = timed_run("fp32, recipe guidance", pipelines["fp32"], asked, log)
    unguided, _ = timed_run("fp32, guidance 1", pipelines["fp32"], asked, log, guidance=1.0)
    half, half_images = timed_run("fp16, recipe guidance", pipelines["fp16"], asked, log)
    again, _ = timed_run(f"fp32 img2img from the fp32 images, strength {IMG2IMG_STRENGTH}", pipelines["fp32"], asked,
                         log, images=images, strength=IMG2IMG_STRENGTH)
    once = meaning.cases(seeds=SAMPLER_SEEDS)
    by_sampler = [timed_run(f"fp32, sampler {sampler}", pipelines["fp32"], once, log, sampler=sampler)[0]
                  for sampler in SAMPLERS]
    return [default, unguided, half, again, *by_sampler], image_psnr(images, half_images)


def markdown(results: list[Run], psnr_db: np.ndarray, stamp: dict, weights: Path) -> str:
    from sdrun.bundle import sha256_file

    summary = ["| run | images | colour | background | shape | seconds |", "|---|---|---|---|---|---|"]
    summary += [f"| {r.label} | {len(r.score.asked)} | {r.score.accuracy('colour'):.1%} | "
                f"{r.score.accuracy('background'):.1%} | {r.score.accuracy('shape'):.1%} | {r.seconds:.1f} |"
                for r in results]
    sections = [f"# tiny-shapes: meaning and fp16 accuracy\n\nWeights `{weights.name}` "
                f"(sha256 `{sha256_file(weights)}`); bars: colour ≥ {meaning.COLOUR_BAR:.0%}, background ≥ "
                f"{meaning.BACKGROUND_BAR:.0%}. Produced by `make bench-shapes`.",
                "## Provenance\n\n" + "\n".join(provenance.summary_lines(stamp)),
                "## Accuracy by the pixel judge\n\n" + "\n".join(summary),
                f"## fp16 vs fp32 images\n\nPSNR over {len(psnr_db)} images: mean {finite_mean(psnr_db):.2f} dB, "
                f"min {psnr_db.min():.2f} dB ({int(np.isinf(psnr_db).sum())} identical)."]
    for run in results[:3]:
        sections.append(f"## Confusion: {run.label}\n\nShape colour:\n\n{meaning.confusion_markdown(run.score.confusion('colour'))}"
                        f"\n\nBackground:\n\n{meaning.confusion_markdown(run.score.confusion('background'))}")
        misses = run.score.misses()
        sections.append("Misses:\n\n" + ("\n".join(f"- {m}" for m in misses) if misses else "none"))
    return "\n\n".join(sections) + "\n"


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite values (identical images have infinite PSNR); inf if all are."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("inf")


def result_dict(results: list[Run], psnr_db: np.ndarray, stamp: dict) -> dict:
    return {"provenance": stamp,
            "runs": [{"label": r.label, "images": len(r.score.asked), "seconds": round(r.seconds, 2),
                      **{f: r.score.accuracy(f) for f in ("colour", "background", "shape")},
                      "confusion_colour": r.score.confusion("colour").tolist(),
                      "confusion_background": r.score.confusion("background").tolist(),
                      "misses": r.score.misses()} for r in results],
            "fp16_psnr_db": {"mean_finite": finite_mean(psnr_db), "min": float(psnr_db.min()),
                             "identical": int(np.isinf(psnr_db).sum())}}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=WEIGHTS,
              show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=REPOSITORY / "build" / "shapes", show_default=True,
              help="where the bundles are exported")
@click.option("--out", type=click.Path(path_type=Path), default=REPOSITORY / "benchmarks" / "results",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: its own)")
def main(weights: Path, work: Path, out: Path, threads: int | None) -> None:
    from sdrun.bundle import write_json_atomic

    started = provenance.started()
    bundles = {p: export_bundle(weights, p, work / p) for p in PRECISIONS}
    pipelines = {p: load(b, threads) for p, b in bundles.items()}
    results, psnr_db = runs(pipelines, click.echo)
    stamp = provenance.finished(started, threads)
    stem = out / f"{stamp['machine']['slug']}-tiny-shapes-meaning"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), result_dict(results, psnr_db, stamp))
    stem.with_suffix(".md").write_text(markdown(results, psnr_db, stamp, weights))
    click.echo(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
