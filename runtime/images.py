"""Images at the edges: the pipeline's float layout and PNGs written with generation parameters
(input files are read by `sdrun.image_input`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrun.atomic import write_atomic


def parameters_text(prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int,
                    width: int, height: int, model_hash: str, model_name: str, extra: dict | None = None,
                    sampler: str = "DDIM") -> str:
    """The `parameters` text chunk in the convention of the popular SD web UIs."""
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance, "Seed": seed, "Size": f"{width}x{height}",
              "Model hash": model_hash[:10], "Model": model_name, **(extra or {})}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; `name-1.png`, `name-2.png`, ... for a batch."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]


def write_png(path: Path, image: np.ndarray, parameters: str) -> None:
    """Write (H, W, 3) uint8 atomically (temp file + rename): never a partial PNG."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    write_atomic(path, lambda temp: Image.fromarray(image).save(temp, format="PNG", pnginfo=info))


HALF_LEVELS = 127.5  # uint8 [0, 255] <-> [-1, 1]


def model_image(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], the pipeline's img2img input."""
    return (pixels.astype(np.float32) / HALF_LEVELS - 1.0).transpose(2, 0, 1)[None]


def image_pixels(image: np.ndarray) -> np.ndarray:
    """The inverse of `model_image` for one (1, 3, H, W) image: (H, W, 3) uint8."""
    return np.round((image[0].transpose(1, 2, 0) + 1.0) * HALF_LEVELS).astype(np.uint8)
