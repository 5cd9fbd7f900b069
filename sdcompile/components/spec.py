"""What every exported component declares: wrapper module, named I/O, profile, sample inputs."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec, resolve_shape
from sdrun.sdxl_conditioning import SIZE_VALUES, SizeConditioning


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One exportable component.

    `wrap(models, recipe)` returns the torch module whose forward takes the inputs in order;
    `sample(recipe, binding, generator)` returns realistic sample inputs, keyed by input name.
    A derived component is not traced: the pass named `derived_by` (a `sdcompile.passes.PASSES`
    name) rewrites the exported graph of `derived_from`.
    """

    name: str
    model: Component  # which of the three models `wrap` takes: components of one model export together
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[..., torch.nn.Module]
    sample: Callable[[Recipe, ShapeBinding, torch.Generator], dict[str, torch.Tensor]]
    description: str = ""
    derived_from: str | None = None
    derived_by: str | None = None


def profile_bindings(recipe: Recipe) -> dict[str, ShapeBinding]:
    """min/opt/max bindings from the recipe's shape ranges.

    `cfg_batch` spans batch.min (guidance 1 runs one half) to 2·batch.max (classifier-free guidance);
    `context_tokens` one prompt chunk (min, opt) to `max_prompt_chunks` of them.
    """
    shapes, scale = recipe.shapes, recipe.vae_scale
    one, most = recipe.text_encoder.context_length, recipe.max_context_tokens
    return {
        "min": ShapeBinding(shapes.batch.min, shapes.batch.min, shapes.height.min, shapes.width.min, scale, one),
        "opt": ShapeBinding(shapes.batch.opt, 2 * shapes.batch.opt, shapes.height.opt, shapes.width.opt, scale, one),
        "max": ShapeBinding(shapes.batch.max, 2 * shapes.batch.max, shapes.height.max, shapes.width.max, scale, most),
    }


def input_profile(spec: ComponentSpec, recipe: Recipe) -> dict[str, dict[str, list[int]]]:
    """Per input: the min/opt/max shapes an engine must accept."""
    bindings = profile_bindings(recipe)
    return {t.name: {level: list(resolve_shape(t.dims, b)) for level, b in bindings.items()}
            for t in spec.inputs}


def trace_binding(recipe: Recipe) -> ShapeBinding:
    """Sample shapes for tracing: the recipe's opt size at batch 2.

    torch.export specialises any dim whose example size is 1, so every dynamic dim is traced ≥ 2.
    """
    batch = max(2, recipe.shapes.batch.opt)
    return ShapeBinding(batch, 2 * batch, recipe.shapes.height.opt, recipe.shapes.width.opt, recipe.vae_scale)


VERIFY_MAX_PIXELS = 256  # the accuracy gate's image side at most: a full-size UNet's attention at 512 px alone
# holds 1 GiB of scores per call, more than a third of its weights


def verify_binding(recipe: Recipe) -> ShapeBinding:
    """Shapes for the accuracy gate: one prompt with guidance at the opt size, capped at
    `VERIFY_MAX_PIXELS` per side (never below the profile's min) — cheaper than the traced batch, and
    a different shape, so the graph's dynamic axes are exercised too."""
    shapes = recipe.shapes
    height, width = (max(r.min, min(r.opt, VERIFY_MAX_PIXELS)) for r in (shapes.height, shapes.width))
    return ShapeBinding(shapes.batch.min, 2 * shapes.batch.min, height, width, recipe.vae_scale)


def dim_multiples(recipe: Recipe) -> dict[str, int]:
    """What each spatial symbol must be a multiple of for every UNet level to line up."""
    latent = recipe.size_multiple // recipe.vae_scale
    return {"latent_height": latent, "latent_width": latent,
            "image_height": recipe.size_multiple, "image_width": recipe.size_multiple}


def random_tensor(spec: TensorSpec, binding: ShapeBinding, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal floats of the spec's shape (fp32)."""
    return torch.randn(resolve_shape(spec.dims, binding), generator=generator)


def added_conditioning_inputs(recipe: Recipe, batch: str) -> tuple[TensorSpec, ...]:
    """SDXL's extra UNet inputs, named as diffusers' `added_cond_kwargs`: the pooled text (batch, P) and the
    six size values (batch, 6) in pixels; none for a UNet without `label_emb`."""
    if not recipe.unet.adm_in_channels:
        return ()
    pooled = next(e for e in recipe.text_encoders if e.pooled_output)
    return (TensorSpec("text_embeds", "float32", (batch, pooled.width)),
            TensorSpec("time_ids", "float32", (batch, SIZE_VALUES)))


def sample_time_ids(recipe: Recipe, batch: int) -> torch.Tensor:
    """(batch, 6) plausible size values: original and target at the opt size, a small crop on odd rows."""
    height, width = recipe.shapes.height.opt, recipe.shapes.width.opt
    rows = [SizeConditioning(height, width, 16 * (i % 2), 8 * (i % 2), height, width) for i in range(batch)]
    return torch.tensor(rows, dtype=torch.float32)
