"""Generated training data for `tiny-shapes`: one shape of one colour on a background of another.

Every image is drawn from a numpy generator alone (no files), with exact palette colours and no
antialiasing, and its caption names the shape, its colour and the background colour.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels, square
# The corners of the RGB cube that have names: any two are ≥ 255 apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZE_RANGE = (20, 44)  # the shape's width and height in pixels, inclusive
MARGIN = 2  # pixels of background at least between the shape and the border
PHRASINGS = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} on {background}",
    "{colour} {shape}, {background} background",
    "a {background} background with a {colour} {shape}",
    "a picture of a {colour} {shape} on a {background} background",
)


@dataclasses.dataclass(frozen=True)
class Labels:
    shape: str
    colour: str
    background: str
    box: tuple[int, int, int, int]  # (left, top, right, bottom) pixels, inclusive


def caption(shape: str, colour: str, background: str, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing].format(shape=shape, colour=colour, background=background)


def sample(rng: np.random.Generator) -> tuple[np.ndarray, str, Labels]:
    """(64, 64, 3) uint8 image, its caption and what it shows; a function of the generator's state alone."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour, background = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    left, top = (int(v) for v in rng.integers(MARGIN, IMAGE_SIZE - MARGIN - size + 1, size=2))
    labels = Labels(shape, colour, background, (left, top, left + size - 1, top + size - 1))
    phrasing = int(rng.integers(len(PHRASINGS)))
    return draw(labels), caption(shape, colour, background, phrasing), labels


def draw(labels: Labels) -> np.ndarray:
    """(64, 64, 3) uint8: the labelled shape filling its box, upright (a triangle's apex at the top centre)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[labels.background])
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = labels.box
    fill = PALETTE[labels.colour]
    if labels.shape == "circle":
        pen.ellipse(labels.box, fill=fill)
    elif labels.shape == "square":
        pen.rectangle(labels.box, fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return np.asarray(image)


def samples(rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str], list[Labels]]:
    """(count, 64, 64, 3) uint8 images with their captions and labels, drawn one after another from `rng`."""
    drawn = [sample(rng) for _ in range(count)]
    return np.stack([d[0] for d in drawn]), [d[1] for d in drawn], [d[2] for d in drawn]
