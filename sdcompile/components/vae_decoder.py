"""VAE decoder: scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1].

The graph divides by the recipe's latent scale factor itself, so the runtime feeds the
sampler's latents unchanged.
"""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec, random_tensor
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module, latent_scale_factor: float):
        super().__init__()
        self.vae = vae
        self.latent_scale_factor = latent_scale_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.latent_scale_factor)


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    (spec,) = vae_decoder_spec(recipe).inputs
    return {"latent": random_tensor(spec, binding, generator)}


def vae_decoder_spec(recipe: Recipe) -> ComponentSpec:
    cfg = recipe.vae
    return ComponentSpec(
        name="vae_decoder",
        model=Component.VAE,
        inputs=(TensorSpec("latent", "float32", ("batch", cfg.embed_dim, "latent_height", "latent_width")),),
        outputs=(TensorSpec("images", "float32", ("batch", cfg.out_ch, "image_height", "image_width")),),
        wrap=lambda models, recipe: VaeDecoderWrapper(models.vae, recipe.latent_scale_factor),
        sample=_sample,
        description="latents as sampled (scaled by latent_scale_factor) -> images in [-1, 1]",
    )
