"""Input images as users give them -> 8-bit pixels at the requested size (img2img images, inpainting masks).

Any file PIL reads, in any mode: EXIF orientation applied; transparency (RGBA, LA, P or L/RGB with a
tRNS colour) composited onto white, as the web UIs' img2img fills transparent parts
(`img2img_background_color`, default #ffffff); 16-bit levels scaled to 8 bits, never clipped; CMYK
converted by PIL (no ICC colour management). Then one of three resize modes reaches the size.
"""
from __future__ import annotations

import contextlib
import enum
import re
import warnings
from pathlib import Path

import numpy as np

from sdrun.errors import UserError

BACKGROUND = (255, 255, 255)  # what transparent pixels become
WIDE_LEVELS = 65535  # 16-bit levels (PIL's "I;16*" and "I" modes), scaled to 255
MODES = ("RGB", "L")  # what a caller may ask for: an image, or a mask


class ResizeMode(str, enum.Enum):
    JUST_RESIZE = "just-resize"  # stretch to the size (aspect not kept)
    CROP = "crop"  # scale to cover the size, then cut the overhang off both sides equally
    FILL = "fill"  # scale to fit inside the size, then stretch the edge pixels over the bands left


DEFAULT_RESIZE_MODE = ResizeMode.JUST_RESIZE  # the web UIs' default, "Just resize"


def load_image(path: Path, width: int, height: int, resize_mode: ResizeMode | str | None = None,
               mode: str = "RGB") -> np.ndarray:
    """The image file at `path` as (height, width, 3) uint8 for mode "RGB", (height, width) uint8 for "L";
    `resize_mode` None: `DEFAULT_RESIZE_MODE`. Unreadable files raise UserError."""
    return fit_pixels(read_pixels(path, mode), width, height, resize_mode)


def read_pixels(path: Path, mode: str = "RGB") -> np.ndarray:
    """The image file at `path` at its own (EXIF-upright) size: (H, W, 3) or (H, W) uint8."""
    from PIL import Image, ImageOps

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    with _read_errors(path):
        with Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
        return np.asarray(flattened(eight_bit(upright)).convert(mode))


def fit_pixels(pixels: np.ndarray, width: int, height: int,
               resize_mode: ResizeMode | str | None = None) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (height, width[, 3]) uint8 by `resize_mode` (None: `DEFAULT_RESIZE_MODE`)."""
    from PIL import Image

    resize_mode = ResizeMode(resize_mode or DEFAULT_RESIZE_MODE)
    if pixels.shape[:2] == (height, width):
        return pixels
    if 0 in pixels.shape[:2]:
        raise UserError("the input image has no pixels.", got=f"{pixels.shape[1]}x{pixels.shape[0]}",
                        fix="send an image at least 1x1")
    image = Image.fromarray(pixels)
    if resize_mode is ResizeMode.JUST_RESIZE:
        return np.asarray(image.resize((width, height), Image.LANCZOS))
    if resize_mode is ResizeMode.CROP:
        box = cover_box(image.width, image.height, width, height)
        return np.asarray(image.resize((width, height), Image.LANCZOS, box=box))
    inner = np.asarray(image.resize(fit_size(image.width, image.height, width, height), Image.LANCZOS))
    return pad_edges(inner, width, height)


def cover_box(source_width: int, source_height: int, width: int, height: int) -> tuple[float, ...]:
    """(left, top, right, bottom) source pixels: the centred region with the target's aspect."""
    scale = min(source_width / width, source_height / height)  # source pixels per output pixel
    box_width, box_height = width * scale, height * scale
    left, top = (source_width - box_width) / 2, (source_height - box_height) / 2
    return left, top, left + box_width, top + box_height


def fit_size(source_width: int, source_height: int, width: int, height: int) -> tuple[int, int]:
    """(width, height): the source's aspect, scaled to touch the target's size from inside."""
    scale = min(width / source_width, height / source_height)
    return (min(width, max(1, round(source_width * scale))), min(height, max(1, round(source_height * scale))))


def pad_edges(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w[, 3]) centred in (height, width[, 3]), the bands filled with copies of the nearest edge pixel."""
    top, left = (height - pixels.shape[0]) // 2, (width - pixels.shape[1]) // 2
    bands = [(top, height - pixels.shape[0] - top), (left, width - pixels.shape[1] - left)]
    return np.pad(pixels, bands + [(0, 0)] * (pixels.ndim - 2), mode="edge")


def eight_bit(image):
    """A PIL image with 16-bit levels ("I;16", "I;16B", "I" from 16-bit PNGs) as 8-bit "L", levels scaled."""
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    levels = np.clip(np.asarray(image).astype(np.float64), 0, WIDE_LEVELS)
    return Image.fromarray(np.round(levels * 255 / WIDE_LEVELS).astype(np.uint8), mode="L")


def flattened(image):
    """A PIL image with any transparency composited onto `BACKGROUND` (RGB); others as they are."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


@contextlib.contextmanager
def _read_errors(path: Path):
    """What PIL raises on a missing, foreign, corrupt, truncated or oversized file, as UserError.

    PIL's decompression-bomb warning (over `Image.MAX_IMAGE_PIXELS`) is refused as its error (over
    twice that) is, so one limit holds."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except FileNotFoundError:
            raise UserError(f"input image {path} does not exist.", fix="pass an existing image file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            claimed = re.search(r"\((\d+) pixels\)", str(err))
            raise UserError(f"input image {path} is too large to read safely.",
                            expected=f"at most {Image.MAX_IMAGE_PIXELS:,} pixels",
                            got=f"{int(claimed[1]):,} pixels" if claimed else str(err),
                            fix="downscale the image first: it is resized to the output size anyway") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise UserError(f"cannot read {path} as an image ({err}).",
                            expected="a complete image file PIL reads (PNG, JPEG, WebP, TIFF, BMP, GIF)",
                            fix="check the file is not truncated or corrupt, or convert it to PNG") from None
