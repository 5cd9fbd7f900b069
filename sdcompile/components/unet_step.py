"""Step-fused UNet: one whole denoising step (CFG + DDIM update) per call.

The graph is derived from the exported UNet by the step-fusion pass (`passes/step_fusion.py`);
`UNetStepWrapper` states the same computation in PyTorch so the derived graph is verified against
eager like any other.
"""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec, random_tensor
from sdcompile.recipes import Recipe
from sdrun.bundle import ShapeBinding, TensorSpec


class UNetStepWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, guidance, step_coefficients, noise):
        # sample, noise (B, 4, h, w); encoder_hidden_states (2B, 77, ctx) as [uncond; cond]
        uncond, cond = self.unet(torch.cat([sample, sample]), timestep, encoder_hidden_states).chunk(2)
        guided = uncond + guidance * (cond - uncond)
        c_x, c_out, sigma = step_coefficients
        return c_x * sample + c_out * guided + sigma * noise


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    spec = unet_step_spec(recipe)
    inputs = {t.name: random_tensor(t, binding, generator) for t in spec.inputs}
    inputs["timestep"] = torch.tensor([501.0])
    inputs["guidance"] = torch.tensor([7.5])
    inputs["step_coefficients"] = torch.tensor([1.02, -0.2, 0.05])  # a mid-schedule DDIM step, eta > 0
    return inputs


def unet_step_spec(recipe: Recipe) -> ComponentSpec:
    cfg, ctx = recipe.unet, recipe.text_encoder
    latent = ("batch", cfg.in_channels, "latent_height", "latent_width")
    return ComponentSpec(
        name="unet_step",
        inputs=(TensorSpec("sample", "float32", latent),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("guided_batch", ctx.context_length, cfg.context_dim)),
                TensorSpec("guidance", "float32", (1,)),
                TensorSpec("step_coefficients", "float32", (3,)),
                TensorSpec("noise", "float32", latent)),
        outputs=(TensorSpec("latent", "float32", latent),),
        wrap=lambda models, recipe: UNetStepWrapper(models.unet),
        sample=_sample,
        description="x_next = c_x·x + c_out·CFG(UNet([x; x], t, [uncond; cond])) + sigma·noise",
        derived_from="unet",
        derived_by="step-fusion",
    )
