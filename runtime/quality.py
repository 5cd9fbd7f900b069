"""Quality signals of generated images: non-finite values, all-black and saturated output.

An image is *black* when at least `FLAT_FRACTION` of its pixels are at most `BLACK_LEVEL` on all three
channels, and *saturated* when at least `FLAT_FRACTION` of its pixels are at 0 or 255 on all three
channels without it being black (blown-out white, or the 0/255 noise an fp16 overflow decodes to).
Non-finite values (NaN/inf) stop the pipeline (`sdrun.pipeline.check_finite` raises `NonFiniteError`);
callers count them with the other signals. Counts are kept per signal for a server's metrics.
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Iterable

import numpy as np

from sdrun.errors import UserError

BLACK_LEVEL = 2  # uint8 levels: 2/255
FLAT_FRACTION = 0.99  # of an image's pixels


class Signal(enum.Enum):
    NON_FINITE = "non_finite"
    BLACK = "black"
    SATURATED = "saturated"


class NonFiniteError(UserError):
    """NaN or inf in a pipeline stage's output (an fp16 graph overflowed, as a rule)."""


def image_signal(image: np.ndarray) -> Signal | None:
    """BLACK, SATURATED or None for one (H, W, 3) uint8 image (module doc)."""
    pixels = image.reshape(-1, image.shape[-1])
    if np.mean(np.all(pixels <= BLACK_LEVEL, axis=1)) >= FLAT_FRACTION:
        return Signal.BLACK
    if np.mean(np.all((pixels == 0) | (pixels == 255), axis=1)) >= FLAT_FRACTION:
        return Signal.SATURATED
    return None


def image_signals(images: Iterable[np.ndarray]) -> list[Signal | None]:
    return [image_signal(image) for image in images]


def describe(signal: Signal) -> str:
    """The warning for an image with `signal`."""
    if signal is Signal.BLACK:
        return (f"the image is black (>= {FLAT_FRACTION:.0%} of pixels <= {BLACK_LEVEL}/255): an fp16 graph may "
                "have lost its range (sdcompile debug precision BUNDLE --component vae_decoder)")
    if signal is Signal.SATURATED:
        return (f"the image is saturated (>= {FLAT_FRACTION:.0%} of pixels at 0 or 255 on every channel): an "
                "fp16 graph may have overflowed (sdcompile debug precision BUNDLE --component unet)")
    return "NaN or inf appeared while generating"


def quality_warnings(images: Iterable[np.ndarray]) -> list[str]:
    """One warning per image with a signal, naming the image by its index in the batch."""
    return [f"image {i}: {describe(signal)}" for i, signal in enumerate(image_signals(images)) if signal is not None]


class QualityCounter:
    """Images seen and images per signal, safe to bump from several loops at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.images = 0
        self.counts = {signal: 0 for signal in Signal}

    def add(self, signals: Iterable[Signal | None]) -> None:
        with self._lock:
            for signal in signals:
                self.images += 1
                if signal is not None:
                    self.counts[signal] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"images": self.images, **{s.value: n for s, n in self.counts.items()}}


def prometheus_text(counter: QualityCounter, model: str) -> str:
    """The counts in Prometheus' text exposition format (counters, labelled by model and signal)."""
    counts = counter.snapshot()
    lines = ["# HELP sdrun_images_total Images generated.", "# TYPE sdrun_images_total counter",
             f'sdrun_images_total{{model="{model}"}} {counts["images"]}',
             "# HELP sdrun_image_quality_total Images with a quality signal: non_finite, black, saturated.",
             "# TYPE sdrun_image_quality_total counter"]
    lines += [f'sdrun_image_quality_total{{model="{model}",signal="{s.value}"}} {counts[s.value]}' for s in Signal]
    return "\n".join(lines) + "\n"
