"""Inpainting masks: reading a mask file, and the mask's forms the pipeline uses.

A mask is (B or 1, 1, H, W) float32 in [0, 1] at the image's size, 1 (white) = repaint. The model sees it
binarised at 0.5 (`repaint_region`), as diffusers' mask processor and ldm's inpainting scripts do; the
final overlay uses it as given, so a soft (blurred) mask gives a soft seam.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrun.errors import UserError
from sdrun.image_input import ResizeMode, fit_pixels, read_pixels

REPAINT_THRESHOLD = 0.5  # mask values at or above it are repainted
BLUR_TRUNCATE = 3.0  # the Gaussian kernel reaches this many standard deviations each side


def read_mask(path: Path, image_size: tuple[int, int], size: tuple[int, int],
              resize_mode: str | None = None) -> tuple[np.ndarray, str | None]:
    """(1, 1, height, width) float32 in [0, 1] from an image file's luminance (white = repaint; transparent is
    white), brought to `size` (height, width) as the input image of own size `image_size` (height, width) is
    by `resize_mode`; a note when the file's size is not the image's, after which it is first stretched
    to the image's (Lanczos, as diffusers' mask processor)."""
    pixels, note = read_pixels(path, mode="L"), None
    if pixels.shape != tuple(image_size):
        note = (f"the mask is {pixels.shape[1]}x{pixels.shape[0]}; resized to the image's "
                f"{image_size[1]}x{image_size[0]}")
        pixels = fit_pixels(pixels, image_size[1], image_size[0], ResizeMode.JUST_RESIZE)
    pixels = fit_pixels(pixels, size[1], size[0], resize_mode)
    return (pixels.astype(np.float32) / 255.0)[None, None], note


def repaint_region(mask: np.ndarray) -> np.ndarray:
    """The mask binarised: 1.0 where it is repainted, else 0.0 (same shape, float32)."""
    return (mask >= REPAINT_THRESHOLD).astype(np.float32)


def latent_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """(B, 1, H/scale, W/scale): the binarised mask at latent size by nearest neighbour (pixel (scale·i,
    scale·j)), as torch's default `interpolate` in diffusers' inpainting pipeline."""
    return np.ascontiguousarray(repaint_region(mask)[:, :, ::scale, ::scale])


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image (B, 3, H, W) in [-1, 1] with its repainted region set to 0 (grey): image · (mask < 0.5)."""
    return (image * (1.0 - repaint_region(mask))).astype(np.float32)


def overlay(decoded: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The decoded pixels where the mask repaints, the input image elsewhere, the mask as alpha
    (the web UIs' overlay): (B, 3, H, W) in [-1, 1]."""
    return (mask * decoded + (1.0 - mask) * image).astype(np.float32)


def blurred(mask: np.ndarray, radius: float) -> np.ndarray:
    """The mask under a Gaussian blur of standard deviation `radius` pixels (separable, edges repeated),
    as the web UIs' `--mask-blur` softens the seam; radius 0 returns it unchanged."""
    if radius <= 0:
        return mask
    reach = int(np.ceil(BLUR_TRUNCATE * radius))
    taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / radius) ** 2)
    taps /= taps.sum()
    out = mask.astype(np.float64)
    for axis in (2, 3):
        padding = [(0, 0)] * 4
        padding[axis] = (reach, reach)
        padded = np.pad(out, padding, mode="edge")
        out = sum(w * np.take(padded, np.arange(k, k + out.shape[axis]), axis=axis) for k, w in enumerate(taps))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def check_mask(mask: np.ndarray, image: np.ndarray | None, batch: int) -> None:
    """A request's mask: with an image, (batch or 1, 1, H, W) at the image's size, finite values in [0, 1]."""
    if image is None:
        raise UserError("a mask needs the image it repaints.", fix="pass --image with --mask")
    expected = f"(1 or {batch}, 1, {image.shape[2]}, {image.shape[3]})"
    shape = tuple(mask.shape)
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1:] != (1, *image.shape[2:]):
        raise UserError("the mask does not fit the image.", expected=expected, got=str(shape),
                        fix="give one single-channel mask per image, at the image's size")
    if not np.issubdtype(mask.dtype, np.floating) or not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise UserError("mask values must be finite floats in [0, 1] (1 = repaint).",
                        got=f"{mask.dtype}, range {np.nanmin(mask):g}..{np.nanmax(mask):g}" if mask.size else "empty",
                        fix="scale the mask to [0, 1]")


def mask_warnings(mask: np.ndarray) -> tuple[str, ...]:
    """What to warn of before painting: an empty mask repaints nothing."""
    if not repaint_region(mask).any():
        return (f"the mask is empty (no value >= {REPAINT_THRESHOLD}): nothing to paint; the output keeps "
                "the input image",)
    return ()
