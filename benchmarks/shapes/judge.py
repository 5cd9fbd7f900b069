"""What an image shows, read from its pixels alone: the background colour, the shape's colour and its kind.

The rule knows the palette and nothing of the model or the prompt:
1. background: the palette colour nearest the per-channel median of the border pixels;
2. shape colour: among pixels far from the background colour, the palette colour most of them are nearest;
3. shape kind: how much of its bounding box the shape colour fills (square 1, circle π/4, triangle 1/2).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.shapes.data import PALETTE

PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # (6, 3)
FAR_FROM_BACKGROUND = 127.5  # RGB distance; half the closest distance between two palette colours
MIN_SHAPE_PIXELS = 16  # fewer pixels far from the background: no shape
# Bounding-box fill ratios halfway between the triangle's 1/2, the circle's π/4 and the square's 1.
FILL_THRESHOLDS = ((0.5 + np.pi / 4) / 2, "triangle"), ((np.pi / 4 + 1.0) / 2, "circle"), (np.inf, "square")


@dataclasses.dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) index into the palette of the nearest colour (Euclidean in RGB)."""
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float64) - PALETTE_RGB, axis=-1)  # (..., 6)
    return distances.argmin(axis=-1)


def border(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (2H + 2W − 4, 3): the outermost ring of pixels."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def background_index(image: np.ndarray) -> int:
    return int(nearest_colour(np.median(border(image), axis=0)))


def shape_kind(mask: np.ndarray) -> str:
    """(H, W) bool, not empty -> the shape whose bounding-box fill ratio is nearest the mask's."""
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    return next(name for threshold, name in FILL_THRESHOLDS if fill < threshold)


def judge(image: np.ndarray) -> Verdict:
    """(H, W, 3) uint8 RGB -> what it shows."""
    names = list(PALETTE)
    background = background_index(image)
    far = np.linalg.norm(image.astype(np.float64) - PALETTE_RGB[background], axis=-1) > FAR_FROM_BACKGROUND
    if far.sum() < MIN_SHAPE_PIXELS:
        return Verdict(names[background], None, None)
    nearest = nearest_colour(image)
    colour = int(np.bincount(nearest[far], minlength=len(names)).argmax())
    return Verdict(names[background], names[colour], shape_kind(far & (nearest == colour)))
