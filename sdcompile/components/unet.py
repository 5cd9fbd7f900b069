"""UNet: one noise prediction over the CFG batch (conventional I/O, interoperable with other tools).

SDXL's UNet also takes `text_embeds` (the pooled text) and `time_ids` (six pixel sizes), as diffusers
names them; the graph embeds the sizes itself, so the runtime feeds plain numbers.
"""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec, added_conditioning_inputs, random_tensor, sample_time_ids
from sdcompile.models.unet import size_conditioning
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # sample (2B, 4, h, w), timestep (1,) shared by the batch, encoder_hidden_states (2B, 77·chunks, ctx);
        # SDXL: text_embeds (2B, P), time_ids (2B, 6)
        return self.unet(sample, timestep, encoder_hidden_states, *self.label((text_embeds, time_ids)))

    def label(self, added: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, ...]:
        """The UNet's y from the added inputs (text_embeds, time_ids), or nothing for a UNet without `label_emb`."""
        present = [a for a in added if a is not None]
        return (size_conditioning(*present, self.unet.config.size_embed_dim),) if present else ()


def sample_added_conditioning(recipe: Recipe, spec: ComponentSpec, binding: ShapeBinding,
                              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random pooled text and plausible size values for the added inputs a spec has (SDXL)."""
    added = {t.name: t for t in spec.inputs if t.name in ("text_embeds", "time_ids")}
    if not added:
        return {}
    text = random_tensor(added["text_embeds"], binding, generator)
    return {"text_embeds": text, "time_ids": sample_time_ids(recipe, text.shape[0])}


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    spec = unet_spec(recipe)
    inputs = {t.name: random_tensor(t, binding, generator) for t in spec.inputs}
    inputs["timestep"] = torch.tensor([501.0])
    return inputs | sample_added_conditioning(recipe, spec, binding, generator)


def unet_spec(recipe: Recipe) -> ComponentSpec:
    cfg = recipe.unet
    latent = ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")
    return ComponentSpec(
        name="unet",
        model=Component.UNET,
        inputs=(TensorSpec("sample", "float32", latent),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("cfg_batch", "context_tokens", cfg.context_dim)),
                *added_conditioning_inputs(recipe, "cfg_batch")),
        outputs=(TensorSpec("latent", "float32", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width")),),
        wrap=lambda models, recipe: UNetWrapper(models.unet),
        sample=_sample,
        description=f"UNet {recipe.parameterization.value}-prediction; timestep shared by the batch",
    )
