"""`python -m benchmarks.shapes.grid` (`make demo`): a tiny-shapes bundle draws a few prompts into one labelled grid.

Each cell is one 64×64 image, enlarged ×3 without smoothing, above its prompt; the PNG carries the
provenance stamp of `benchmarks.provenance`.
"""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import click
import numpy as np

from benchmarks import provenance
from benchmarks.shapes import meaning

DEMO_PROMPTS = (
    meaning.Prompted("circle", "red", "blue"),
    meaning.Prompted("square", "yellow", "black"),
    meaning.Prompted("triangle", "white", "green"),
    meaning.Prompted("circle", "green", "white"),
    meaning.Prompted("square", "blue", "yellow", phrasing=3),
    meaning.Prompted("triangle", "black", "red", phrasing=1),
    meaning.Prompted("circle", "yellow", "blue", phrasing=2),
    meaning.Prompted("triangle", "red", "white", phrasing=4),
)
COLUMNS = 4
ZOOM = 3
LABEL_CHARS = 30  # per line, in Pillow's default bitmap font
LABEL_LINES = 2
LINE_PIXELS = 12
PAD = 6


def draw_grid(images: np.ndarray, labels: list[str]):
    """(N, h, w, 3) uint8 images and their labels -> a PIL image, COLUMNS cells per row."""
    from PIL import Image, ImageDraw

    count, height, width, _ = images.shape
    cell_w, cell_h = width * ZOOM + 2 * PAD, height * ZOOM + 2 * PAD + LABEL_LINES * LINE_PIXELS
    rows = -(-count // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * cell_w, rows * cell_h), (245, 245, 245))
    pen = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        left, top = (index % COLUMNS) * cell_w + PAD, (index // COLUMNS) * cell_h + PAD
        grid.paste(Image.fromarray(image).resize((width * ZOOM, height * ZOOM), Image.NEAREST), (left, top))
        lines = textwrap.wrap(label, LABEL_CHARS)[:LABEL_LINES]
        for line_index, line in enumerate(lines):
            pen.text((left, top + height * ZOOM + 2 + line_index * LINE_PIXELS), line, fill=(20, 20, 20))
    return grid


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="grid PNG to write")
@click.option("--seed", type=int, default=0, show_default=True)
def main(bundle: Path, out: Path, seed: int) -> None:
    from sdrun.session import load_pipeline

    started = provenance.started()
    pipeline = load_pipeline(bundle, "onnxruntime").pipeline
    start = time.perf_counter()
    images = meaning.generate(pipeline, [meaning.Case(p, seed) for p in DEMO_PROMPTS])
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(images, [p.prompt for p in DEMO_PROMPTS]).save(out)
    provenance.stamp_png(out, provenance.finished(started, None))
    click.echo(f"wrote {out}: {len(images)} prompts, seed {seed}, generated in {seconds:.2f} s")


if __name__ == "__main__":
    main()
