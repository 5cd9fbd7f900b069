"""The causal text transformers that condition Stable Diffusion (Radford et al. 2021, §2.4).

SD1 uses OpenAI CLIP ViT-L/14 as stored by Hugging Face `CLIPTextModel` (keys `transformer.text_model.…`);
SD2 uses OpenCLIP ViT-H/14 as stored by open_clip (keys `model.…`); SDXL uses both, CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14, each read before its final LayerNorm (PENULTIMATE_HIDDEN), and bigG's pooled output. The two are the same computation —
pre-LN transformer blocks (LayerNorm eps 1e-5), learned absolute positions, causal self-attention —
under different parameter names, a fused q/k/v projection in open_clip, and a different MLP activation.
Both map token ids (B, context_length) to hidden states (B, context_length, width), taken after all blocks
(LAST) or all but the last (PENULTIMATE, PENULTIMATE_HIDDEN), then through the final LayerNorm except for
PENULTIMATE_HIDDEN. The pooled output (SDXL's encoder 2) is the final LayerNorm of the last block's output
at the end-of-text token (the largest id, so the argmax), times `text_projection`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdcompile.models.attention import AttentionImpl, attention, merge_heads, split_heads
from sdcompile.recipes import TextActivation, TextEncoderConfig, TextEncoderKind, TextOutputLayer

LAYER_NORM_EPS = 1e-5
MLP_RATIO = 4
QUICK_GELU_ALPHA = 1.702  # x·sigmoid(1.702x) ≈ GELU (Hendrycks & Gimpel 2016, §2)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, §2.5)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def activation_module(activation: TextActivation) -> nn.Module:
    return QuickGELU() if activation is TextActivation.QUICK_GELU else nn.GELU(approximate="none")


def blocks_to_run(config: TextEncoderConfig) -> int:
    """How many transformer blocks feed the output hidden states."""
    return config.hidden_state_blocks


def applies_final_norm(config: TextEncoderConfig) -> bool:
    return config.output_layer is not TextOutputLayer.PENULTIMATE_HIDDEN


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          impl: AttentionImpl) -> torch.Tensor:
    """(B, S, width) projections -> (B, S, width) attention output, each token seeing itself and earlier ones."""
    out = attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), impl, causal=True)
    return merge_heads(out)


def layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=LAYER_NORM_EPS)


# --- SD1: Hugging Face CLIPTextModel layout ------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, attention_impl: AttentionImpl):
        super().__init__()
        self.heads = heads
        self.attention_impl = attention_impl
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.attention_impl)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, activation: TextActivation):
        super().__init__()
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.activation = activation_module(activation)
        self.fc2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.layer_norm1 = layer_norm(config.width)
        self.self_attn = CLIPAttention(config.width, config.heads, attention_impl)
        self.layer_norm2 = layer_norm(config.width)
        self.mlp = CLIPMLP(config.width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)
        # Persistent so that the keys equal those of ldm checkpoints, which store it.
        self.register_buffer("position_ids", torch.arange(config.context_length, dtype=torch.int64)[None],
                             persistent=True)  # (1, context_length)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, S, width)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, attention_impl) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.blocks_to_run = blocks_to_run(config)
        self.final_norm = applies_final_norm(config)
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config, attention_impl)
        self.final_layer_norm = layer_norm(config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers[: self.blocks_to_run]:
            x = layer(x)
        return self.final_layer_norm(x) if self.final_norm else x


class CLIPTextModel(nn.Module):
    """Holds `text_model`, as Hugging Face's CLIPTextModel did when SD1 checkpoints were saved."""

    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.text_model = CLIPTextTransformer(config, attention_impl)


class CLIPTextEncoder(nn.Module):
    """SD1's text encoder; keys = checkpoint keys minus `cond_stage_model.`."""

    def __init__(self, config: TextEncoderConfig, attention: AttentionImpl = AttentionImpl.SDPA):
        super().__init__()
        self.transformer = CLIPTextModel(config, attention)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, context_length) int32/int64 -> hidden states (B, context_length, width)."""
        return self.transformer.text_model(input_ids)


# --- SD2: open_clip layout ----------------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """Self-attention with q, k, v stacked in one (3·width, width) projection, as in nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int, attention_impl: AttentionImpl):
        super().__init__()
        self.heads = heads
        self.attention_impl = attention_impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # each (B, S, width)
        return self.out_proj(causal_self_attention(q, k, v, self.heads, self.attention_impl))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, activation: TextActivation):
        super().__init__()
        self.c_fc = nn.Linear(width, MLP_RATIO * width)
        self.activation = activation_module(activation)
        self.c_proj = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.ln_1 = layer_norm(config.width)
        self.attn = OpenCLIPAttention(config.width, config.heads, attention_impl)
        self.ln_2 = layer_norm(config.width)
        self.mlp = OpenCLIPMLP(config.width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config, attention_impl) for _ in range(config.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip's CLIP without its vision tower.

    Without the pooled output, blocks past `blocks_to_run`, `text_projection` and `logit_scale` do not
    affect the output; they are kept so that real checkpoints load strictly.
    """

    def __init__(self, config: TextEncoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        self.blocks_to_run = blocks_to_run(config)
        self.final_norm = applies_final_norm(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = OpenCLIPTransformer(config, attention_impl)
        self.ln_final = layer_norm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.width))
        self.logit_scale = nn.Parameter(torch.full((), LOGIT_SCALE_INIT))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width ** -0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.output(self.run_blocks(input_ids))

    def run_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> the residual stream after `blocks_to_run` blocks (B, S, width)."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]  # (B, S, width)
        for block in self.transformer.resblocks[: self.blocks_to_run]:
            x = block(x)
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x) if self.final_norm else x

    def pooled(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`run_blocks`' result -> the remaining blocks, ln_final at each row's end token, @ text_projection:
        (B, width), as open_clip's `encode_text` before normalising."""
        for block in self.transformer.resblocks[self.blocks_to_run:]:
            x = block(x)
        end = input_ids.argmax(dim=-1)  # (B,) <end_of_text> has the largest id in the CLIP vocabulary
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), end])  # (B, width)
        return x @ self.text_projection


class OpenCLIPTextEncoder(nn.Module):
    """SD2's text encoder; keys = checkpoint keys minus `cond_stage_model.`."""

    def __init__(self, config: TextEncoderConfig, attention: AttentionImpl = AttentionImpl.SDPA):
        super().__init__()
        self.model = OpenCLIPTextModel(config, attention)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, context_length) int32/int64 -> hidden states (B, context_length, width)."""
        return self.model(input_ids)


class OpenCLIPPooledTextEncoder(OpenCLIPTextEncoder):
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14); keys = checkpoint keys minus `conditioner.embedders.1.`."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, context_length) -> hidden states (B, context_length, width), pooled (B, width)."""
        x = self.model.run_blocks(input_ids)
        return self.model.output(x), self.model.pooled(x, input_ids)


TEXT_ENCODERS = {
    TextEncoderKind.CLIP: CLIPTextEncoder,
    TextEncoderKind.OPENCLIP: OpenCLIPTextEncoder,
}


def build_text_encoder(config: TextEncoderConfig,
                       attention: AttentionImpl = AttentionImpl.SDPA) -> CLIPTextEncoder | OpenCLIPTextEncoder:
    """The recipe's encoder; one with `pooled_output` returns (hidden states, pooled) from forward."""
    if config.pooled_output:
        if config.kind is not TextEncoderKind.OPENCLIP:
            raise ValueError(f"pooled_output is implemented for the OpenCLIP tower, not {config.kind.value}")
        return OpenCLIPPooledTextEncoder(config, attention)
    return TEXT_ENCODERS[config.kind](config, attention)
