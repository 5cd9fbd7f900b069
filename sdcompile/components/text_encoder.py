"""Text encoder: token ids (B, 77) int32 -> text embeddings (B, 77, width)."""
from __future__ import annotations

import torch

from sdcompile.components.spec import ComponentSpec
from sdcompile.recipes import Recipe
from sdcompile.weights.layout import Component
from sdrun.bundle import ShapeBinding, TensorSpec


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)  # (B, 77, width)


def _sample(recipe: Recipe, binding: ShapeBinding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = recipe.text_encoder
    ids = torch.randint(0, cfg.vocab_size - 2, (binding.cfg_batch, cfg.context_length),
                        generator=generator, dtype=torch.int32)
    ids[:, 0] = cfg.vocab_size - 2  # <start_of_text>
    ids[:, -1] = cfg.vocab_size - 1  # <end_of_text>
    return {"input_ids": ids}


def text_encoder_spec(recipe: Recipe) -> ComponentSpec:
    cfg = recipe.text_encoder
    return ComponentSpec(
        name="text_encoder",
        model=Component.TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", "int32", ("cfg_batch", cfg.context_length)),),
        outputs=(TensorSpec("text_embeddings", "float32", ("cfg_batch", cfg.context_length, cfg.width)),),
        wrap=lambda models, recipe: TextEncoderWrapper(models.text_encoder),
        sample=_sample,
        description="CLIP/OpenCLIP text transformer: prompt and negative prompt ids in one batch",
    )
