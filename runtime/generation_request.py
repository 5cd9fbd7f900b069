"""A generation request: its fields, the defaults the recipe fills in, and every check made before heavy work.

Validation reads only the request and the recipe (no model, no file): a request the pipeline accepts runs.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from sdrun.errors import UserError
from sdrun.masks import check_mask
from sdrun.recipe import Recipe, ShapeRange
from sdrun.sampling import sampler_plan
from sdrun.sdxl_conditioning import SizeConditioning

SIZE_MULTIPLE = 8  # SDXL's size conditioning: pixel sizes, as its training data's, in multiples of 8


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the recipe's default
    guidance: float | None = None  # None: the recipe's default
    seed: int = 0
    height: int | None = None  # None: the recipe's default (pixels)
    width: int | None = None
    batch: int = 1
    eta: float | None = None  # DDIM only; None: 0 (deterministic)
    init_noise: np.ndarray | None = None  # (batch, 4, h, w) float32 instead of the seeded draw
    image: np.ndarray | None = None  # img2img input (batch or 1, 3, H, W) float32 in [-1, 1]
    strength: float = 0.75  # img2img: fraction of the schedule re-run
    mask: np.ndarray | None = None  # inpainting, with `image`: (batch or 1, 1, H, W) float32 in [0, 1], 1 = repaint
    sampler: str | None = None  # a name or id from `sdrun samplers`; None: the recipe's default (DDIM)
    karras: bool | None = None  # Karras sigmas (samplers that have sigmas); None: the sampler's default
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the sampler's default
    # SDXL's size conditioning in pixels (height, width); None: the output size, crop (0, 0)
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None  # (top, left)
    target_size: tuple[int, int] | None = None
    max_chunks: int | None = None  # prompt chunks of 75 tokens allowed; None: the most the bundle's UNet takes
    validated: bool = dataclasses.field(default=False, compare=False)  # set by `complete_request` alone


def starts_from_image(request: GenerationRequest) -> bool:
    """Whether the loop starts from the noised image (img2img, inpainting below strength 1) or from noise."""
    return request.image is not None and (request.mask is None or request.strength < 1.0)


def batch_key(request: GenerationRequest) -> tuple:
    """What requests must share to run in one denoising loop: everything but prompts, seed, batch and
    noise (a completed request's fields; the guidance scale is one number per loop)."""
    return (request.height, request.width, request.steps, request.sampler, request.karras, request.spacing,
            request.eta, request.guidance, request.image is None, request.mask is None, request.strength)


def check_batchable(requests: Sequence[GenerationRequest], recipe: Recipe) -> None:
    keys = {batch_key(r) for r in requests}
    if len(keys) != 1:
        raise ValueError(f"requests of {len(keys)} kinds cannot share one denoising loop: {sorted(keys, key=str)}")
    total, allowed = sum(r.batch for r in requests), recipe.shapes.batch
    if total > allowed.max:
        raise UserError(f"{len(requests)} requests of {total} images in all exceed the bundle's batch profile.",
                        expected=f"at most {allowed.max} images per loop", got=str(total),
                        fix="send fewer images per batch, or widen shapes.batch in the recipe and re-export")


def complete_request(request: GenerationRequest, recipe: Recipe, img2img: bool | None = None) -> GenerationRequest:
    """Fill None fields from the recipe and validate everything before any heavy work. `img2img` None: whether
    the request has an image; True validates img2img's options for an image read afterwards at the filled size."""
    filled = dataclasses.replace(
        request,
        steps=recipe.default_steps if request.steps is None else request.steps,
        guidance=recipe.default_guidance if request.guidance is None else request.guidance,
        height=recipe.default_height if request.height is None else request.height,
        width=recipe.default_width if request.width is None else request.width,
        sampler=recipe.default_sampler if request.sampler is None else request.sampler)
    if recipe.unet.adm_in_channels:
        filled = dataclasses.replace(filled, **_size_defaults(filled))
    validate_request(filled, recipe, img2img=starts_from_image(filled) if img2img is None else img2img)
    return dataclasses.replace(filled, validated=True)


def validate_request(request: GenerationRequest, recipe: Recipe, img2img: bool) -> None:
    _check_finite_numbers(request)
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise UserError("steps must be a positive integer.", got=repr(request.steps), fix="e.g. --steps 50")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or request.seed < 0:
        raise UserError("seed must be a non-negative integer.", got=repr(request.seed), fix="e.g. --seed 42")
    for axis, value in (("height", request.height), ("width", request.width)):
        _check_size(axis, value, getattr(recipe.shapes, axis), recipe.size_multiple)
    batch = recipe.shapes.batch
    if not batch.min <= request.batch <= batch.max:
        raise UserError("batch is outside the bundle's profile.", expected=f"{batch.min}..{batch.max}",
                        got=str(request.batch), fix="lower --batch or widen shapes.batch in the recipe")
    _check_size_conditioning(request, recipe)
    if request.mask is not None:
        check_mask(request.mask, request.image, request.batch)
    chunks = request.max_chunks
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise UserError("--max-chunks must be a positive integer.", got=repr(chunks),
                        fix=f"e.g. --max-chunks {recipe.max_prompt_chunks}, or leave it out for the bundle's most")
    request_plan(request, recipe, img2img)  # every sampler option, strength included (milliseconds)
    if request.guidance < 1.0:
        raise UserError("guidance must be >= 1.", got=str(request.guidance), fix="use 1 (off) or e.g. 7.5")
    if request.init_noise is not None:
        expected = latent_shape(request, recipe)
        if tuple(request.init_noise.shape) != expected:
            raise UserError("--init-noise has the wrong shape.", expected=str(expected),
                            got=str(tuple(request.init_noise.shape)),
                            fix="save (batch, 4, height/8, width/8) float32 noise with numpy.save")


FLOAT_OPTIONS = {"guidance": "--guidance 7.5", "eta": "--eta 0", "strength": "--strength 0.75"}  # with an example


def _check_finite_numbers(request: GenerationRequest) -> None:
    """NaN or inf would run the whole loop and then look like an fp16 overflow: refused first."""
    for name, example in FLOAT_OPTIONS.items():
        value = getattr(request, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
            raise UserError(f"{name} must be a finite number.", expected="a number, not NaN or infinity",
                            got=repr(value), fix=f"e.g. {example}")


def size_conditioning(request: GenerationRequest) -> SizeConditioning:
    """A completed SDXL request's six size values (its `time_ids` row)."""
    return SizeConditioning(*request.original_size, *request.crop, *request.target_size)


def _size_defaults(request: GenerationRequest) -> dict:
    """SDXL's defaults for a request whose output size is filled in: original and target size the output
    size, no crop (diffusers' pipeline does the same)."""
    size = (request.height, request.width)
    return {"original_size": request.original_size or size, "crop": request.crop or (0, 0),
            "target_size": request.target_size or size}


SIZE_OPTIONS = {"original_size": "--original-size", "crop": "--crop", "target_size": "--target-size"}


def _check_size_conditioning(request: GenerationRequest, recipe: Recipe) -> None:
    given = {field: getattr(request, field) for field in SIZE_OPTIONS}
    if not recipe.unet.adm_in_channels:
        named = [SIZE_OPTIONS[f] for f, value in given.items() if value is not None]
        if named:
            raise UserError(f"{', '.join(named)} condition SDXL's UNet; recipe {recipe.name} has no size conditioning.",
                            fix="leave them out, or use an SDXL bundle")
        return
    for field, value in given.items():
        smallest = 0 if field == "crop" else SIZE_MULTIPLE
        ok = (isinstance(value, tuple) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= smallest and v % SIZE_MULTIPLE == 0
                      for v in value))
        if not ok:
            kind = "non-negative" if field == "crop" else "positive"
            raise UserError(f"{SIZE_OPTIONS[field]} must be two {kind} multiples of {SIZE_MULTIPLE} (pixels).",
                            expected=f"HEIGHT WIDTH, e.g. {SIZE_OPTIONS[field]} 1024 1024" if field != "crop"
                            else "TOP LEFT, e.g. --crop 0 0", got=repr(value),
                            fix=f"round each value to a multiple of {SIZE_MULTIPLE}")


def request_plan(request: GenerationRequest, recipe: Recipe, img2img: bool):
    """The sampler plan of a request; for img2img, of the steps `request.strength` keeps."""
    strength = request.strength if img2img else None
    return sampler_plan(recipe, request.sampler, request.steps, request.karras, request.spacing, request.eta,
                        request.guidance, strength)


def _check_size(axis: str, value: int, allowed: ShapeRange, multiple: int) -> None:
    if value % multiple:
        raise UserError(f"{axis} {value} is not a multiple of {multiple}.",
                        expected=f"a multiple of {multiple} (8 pixels per latent × {multiple // 8} UNet levels)",
                        got=str(value), fix=f"use {max(multiple, value - value % multiple)}")
    if not allowed.min <= value <= allowed.max:
        raise UserError(f"{axis} {value} is outside the bundle's profile.",
                        expected=f"{allowed.min}..{allowed.max}", got=str(value),
                        fix="pick a size in range, or widen shapes in the recipe and re-export")


def latent_shape(request: GenerationRequest, recipe: Recipe) -> tuple[int, int, int, int]:
    scale = recipe.vae_scale
    return (request.batch, recipe.unet.out_channels, request.height // scale, request.width // scale)
