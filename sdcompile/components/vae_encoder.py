"""VAE encoder: images (B, 3, H, W) in [-1, 1] -> scaled posterior moments (B, 2·4, H/8, W/8).

Output channels [0:4] are the posterior mean and [4:8] its standard deviation, both already
multiplied by the latent scale factor, so a latent sample is `mean + std · noise`
(Kingma & Welling 2014, reparameterisation) with no further scaling.
"""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec, resolve_shape


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module, latent_scale_factor: float):
        super().__init__()
        self.vae = vae
        self.latent_scale_factor = latent_scale_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images)
        return torch.cat([posterior.mean, posterior.std], dim=1) * self.latent_scale_factor


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    (spec,) = vae_encoder_spec(recipe).inputs
    images = torch.rand(resolve_shape(spec.dims, binding), generator=generator) * 2 - 1
    return {"images": images}


def vae_encoder_spec(recipe: Recipe) -> ComponentSpec:
    cfg = recipe.vae
    return ComponentSpec(
        name="vae_encoder",
        model=Component.VAE,
        inputs=(TensorSpec("images", "float32", ("batch", cfg.in_channels, "image_height", "image_width")),),
        outputs=(TensorSpec("latent", "float32", ("batch", 2 * cfg.embed_dim, "latent_height", "latent_width")),),
        wrap=lambda models, recipe: VaeEncoderWrapper(models.vae, recipe.latent_scale_factor),
        sample=_sample,
        description="images in [-1, 1] -> [scaled mean | scaled std] of the latent posterior",
    )
