"""Step-fused UNet: one whole denoising step of any sampler (guidance + the plan's linear update) per call.

The graph is derived from the exported UNet by the step-fusion pass (`passes/step_fusion.py`);
`UNetStepWrapper` states the same computation in PyTorch so the derived graph is verified against
eager like any other.
"""
from __future__ import annotations

import numpy as np
import torch

from sdcompile.components.spec import ComponentSpec, added_conditioning_inputs, random_tensor
from sdcompile.components.unet import UNetWrapper, sample_added_conditioning
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec
from sdrun.recipe import INPAINT_CHANNELS
from sdrun.samplers import make_plan, resolve_sampler
from sdrun.samplers.plan import STATE_WIDTH, fused_update_rows

VERIFY_SAMPLER, VERIFY_EVALUATION = "dpmpp_2m_sde", 5  # an evaluation with stored slots and noise


class UNetStepWrapper(UNetWrapper):
    def __init__(self, unet: torch.nn.Module, inpainting: bool = False):
        super().__init__(unet)
        self.inpainting = inpainting

    def forward(self, state, timestep, input_scale, encoder_hidden_states, *rest):
        # state (W, B, 4, h, w); noise (B, 4, h, w); encoder_hidden_states (2B, 77·chunks, ctx) as [uncond; cond];
        # rest: SDXL's text_embeds (2B, P) and time_ids (2B, 6), an inpainting UNet's mask (2B, 1, h, w) and
        # masked_image_latents (2B, 4, h, w), then guidance, update, noise
        *conditioning, guidance, update, noise = rest
        extra = len(INPAINT_CHANNELS) if self.inpainting else 0
        added, channels = conditioning[:len(conditioning) - extra], conditioning[len(conditioning) - extra:]
        x_in = input_scale * state[0]
        uncond, cond = self.unet(torch.cat([torch.cat([x_in, x_in]), *channels], dim=1), timestep,
                                 encoder_hidden_states, *self.label(tuple(added))).chunk(2)
        guided = uncond + guidance * (cond - uncond)
        operands = torch.cat([state, guided[None], noise[None]])  # (W + 2, B, 4, h, w)
        return (update @ operands.flatten(1)).reshape(state.shape)


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random state and noise at one real evaluation of a sampler plan."""
    spec = unet_step_spec(recipe)
    inputs = {t.name: random_tensor(t, binding, generator) for t in spec.inputs}
    plan = make_plan(resolve_sampler(VERIFY_SAMPLER), recipe.schedule, recipe.parameterization, 20)
    e = VERIFY_EVALUATION
    inputs["timestep"] = torch.tensor([plan.timesteps[e]], dtype=torch.float32)
    inputs["input_scale"] = torch.tensor([plan.c_in[e]], dtype=torch.float32)
    inputs["guidance"] = torch.tensor([7.5])
    inputs["update"] = torch.from_numpy(np.ascontiguousarray(fused_update_rows(plan)[e]))
    return inputs | sample_added_conditioning(recipe, spec, binding, generator)


def unet_step_spec(recipe: Recipe) -> ComponentSpec:
    cfg = recipe.unet
    latent = ("batch", cfg.out_channels, "latent_height", "latent_width")
    state = (STATE_WIDTH, *latent)
    inpainting = tuple(TensorSpec(name, "float32", ("guided_batch", channels, "latent_height", "latent_width"))
                       for name, channels in INPAINT_CHANNELS.items()) if cfg.inpainting else ()
    return ComponentSpec(
        name="unet_step",
        model=Component.UNET,
        inputs=(TensorSpec("state", "float32", state),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("input_scale", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("guided_batch", "context_tokens", cfg.context_dim)),
                *added_conditioning_inputs(recipe, "guided_batch"),
                *inpainting,
                TensorSpec("guidance", "float32", (1,)),
                TensorSpec("update", "float32", (STATE_WIDTH, STATE_WIDTH + 2)),
                TensorSpec("noise", "float32", latent)),
        outputs=(TensorSpec("next_state", "float32", state),),
        wrap=lambda models, recipe: UNetStepWrapper(models.unet, recipe.unet.inpainting),
        sample=_sample,
        description="next_state = update @ [state, CFG(UNet([c·x; c·x], t, [uncond; cond])), noise]",
        derived_from="unet",
        derived_by="step-fusion",
    )
