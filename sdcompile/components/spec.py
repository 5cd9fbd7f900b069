"""What every exported component declares: wrapper module, named I/O, profile, sample inputs."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sdcompile.recipes import Recipe
from sdrun.bundle import ShapeBinding, TensorSpec, resolve_shape


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One exportable component.

    `wrap(models, recipe)` returns the torch module whose forward takes the inputs in order;
    `sample(recipe, binding, generator)` returns realistic sample inputs, keyed by input name.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[..., torch.nn.Module]
    sample: Callable[[Recipe, ShapeBinding, torch.Generator], dict[str, torch.Tensor]]
    description: str = ""


def profile_bindings(recipe: Recipe) -> dict[str, ShapeBinding]:
    """min/opt/max bindings from the recipe's shape ranges.

    `cfg_batch` spans batch.min (guidance 1 runs one half) to 2·batch.max (classifier-free guidance).
    """
    shapes, scale = recipe.shapes, recipe.vae_scale
    return {
        "min": ShapeBinding(shapes.batch.min, shapes.batch.min, shapes.height.min, shapes.width.min, scale),
        "opt": ShapeBinding(shapes.batch.opt, 2 * shapes.batch.opt, shapes.height.opt, shapes.width.opt, scale),
        "max": ShapeBinding(shapes.batch.max, 2 * shapes.batch.max, shapes.height.max, shapes.width.max, scale),
    }


def input_profile(spec: ComponentSpec, recipe: Recipe) -> dict[str, dict[str, list[int]]]:
    """Per input: the min/opt/max shapes an engine must accept."""
    bindings = profile_bindings(recipe)
    return {t.name: {level: list(resolve_shape(t.dims, b)) for level, b in bindings.items()}
            for t in spec.inputs}


def opt_binding(recipe: Recipe, batch: int | None = None, guidance: bool = True) -> ShapeBinding:
    """The binding at the recipe's optimal size; `None` batch means the recipe's opt batch."""
    batch = recipe.shapes.batch.opt if batch is None else batch
    return ShapeBinding(batch, 2 * batch if guidance else batch, recipe.shapes.height.opt,
                        recipe.shapes.width.opt, recipe.vae_scale)


def random_tensor(spec: TensorSpec, binding: ShapeBinding, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal floats of the spec's shape (fp32)."""
    return torch.randn(resolve_shape(spec.dims, binding), generator=generator)
