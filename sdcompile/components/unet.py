"""UNet: one noise prediction over the CFG batch (conventional I/O, interoperable with other tools)."""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec, random_tensor
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # sample (2B, 4, h, w), timestep (1,) shared by the batch, encoder_hidden_states (2B, 77, ctx)
        return self.unet(sample, timestep, encoder_hidden_states)


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    spec = unet_spec(recipe)
    inputs = {t.name: random_tensor(t, binding, generator) for t in spec.inputs}
    inputs["timestep"] = torch.tensor([501.0])
    return inputs


def unet_spec(recipe: Recipe) -> ComponentSpec:
    cfg, ctx = recipe.unet, recipe.text_encoder
    latent = ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")
    return ComponentSpec(
        name="unet",
        model=Component.UNET,
        inputs=(TensorSpec("sample", "float32", latent),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("cfg_batch", ctx.context_length, cfg.context_dim))),
        outputs=(TensorSpec("latent", "float32", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width")),),
        wrap=lambda models, recipe: UNetWrapper(models.unet),
        sample=_sample,
        description=f"UNet {recipe.parameterization.value}-prediction; timestep shared by the batch",
    )
