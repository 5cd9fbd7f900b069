"""Text encoders: token ids (B, 77) int32 -> text embeddings (B, 77, width); SDXL's second one also
returns its pooled text (B, width), the UNet's `text_embeds`."""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec
from sdcompile.recipes import Recipe, TextEncoderConfig
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec
from sdrun.pipeline import POOLED_OUTPUT


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        return self.text_encoder(input_ids)  # (B, 77, width), and (B, width) pooled when the encoder pools


def _sample_ids(cfg: TextEncoderConfig, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, cfg.vocab_size - 2, (binding.cfg_batch, cfg.context_length),
                        generator=generator, dtype=torch.int32)
    ids[:, 0] = cfg.vocab_size - 2  # <start_of_text>
    ids[:, -1] = cfg.vocab_size - 1  # <end_of_text>
    return {"input_ids": ids}


def _encoder_spec(model: Component, cfg: TextEncoderConfig, description: str) -> ComponentSpec:
    pooled = (TensorSpec(POOLED_OUTPUT, "float32", ("cfg_batch", cfg.width)),) if cfg.pooled_output else ()
    return ComponentSpec(
        name=model.value,
        model=model,
        inputs=(TensorSpec("input_ids", "int32", ("cfg_batch", cfg.context_length)),),
        outputs=(TensorSpec("text_embeddings", "float32", ("cfg_batch", cfg.context_length, cfg.width)), *pooled),
        wrap=lambda models, recipe: TextEncoderWrapper(models.component(model)),
        sample=lambda recipe, binding, generator: _sample_ids(cfg, binding, generator),
        description=description,
    )


def text_encoder_spec(recipe: Recipe) -> ComponentSpec:
    return _encoder_spec(Component.TEXT_ENCODER, recipe.text_encoder,
                         "CLIP/OpenCLIP text transformer: prompt and negative prompt ids in one batch")


def text_encoder_2_spec(recipe: Recipe) -> ComponentSpec:
    """SDXL's OpenCLIP bigG: hidden states concatenated after encoder 1's, and the pooled text."""
    if recipe.text_encoder_2 is None:
        raise ValueError(f"recipe {recipe.name} has one text encoder")
    return _encoder_spec(Component.TEXT_ENCODER_2, recipe.text_encoder_2,
                         "second text transformer (SDXL): hidden states and the pooled text, ids in one batch")
