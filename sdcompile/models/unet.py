"""The Stable Diffusion 1.x / 2.x / XL denoising UNet (ldm and generative-models `openaimodel.UNetModel`).

Numerics and state_dict layout follow the original (`ldm/modules/diffusionmodules/openaimodel.py`,
`util.py`, `ldm/modules/attention.py`): `state_dict()` keys are the checkpoint keys minus
`model.diffusion_model.`. Differences that do not change results: no gradient checkpointing, no
fp16 cast at the top of `forward`, no dropout (its slots stay as `nn.Identity` so key indices match),
and attention goes through `sdcompile.models.attention` with the implementation chosen per instance.

SDXL adds per-level transformer depths (none at depth 0) and `label_emb`, an MLP over the extra
conditioning vector y (`sdrun.sdxl_conditioning`) whose output is added to the timestep embedding.

Spatial sizes must be multiples of 2^(len(channel_mult) − 1) so that every skip connection lines up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdcompile.models.attention import AttentionImpl, attention, merge_heads, split_heads
from sdcompile.recipes import UNetConfig

RESBLOCK_NORM_EPS = 1e-5  # ldm util.normalization: GroupNorm32(32, ch) with nn.GroupNorm's default eps
TRANSFORMER_NORM_EPS = 1e-6  # ldm attention.Normalize
NORM_GROUPS = 32
FEED_FORWARD_MULT = 4
MAX_PERIOD = 10000


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, §3.5), cos first: (B,) -> (B, dim) fp32.

    Same as ldm `util.timestep_embedding` (and diffusers with flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    # ldm's order of operations, (−ln P · i) / half in fp32, so that the rounding matches it and diffusers
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(exponent)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def size_conditioning(text_embeds: torch.Tensor, time_ids: torch.Tensor, size_embed_dim: int) -> torch.Tensor:
    """SDXL's y (Podell et al. 2023, §2.2): pooled text (B, P) and six pixel sizes (B, 6) ->
    [pooled, emb(each size)] (B, P + 6·size_embed_dim), each size embedded as a timestep is."""
    sizes = timestep_embedding(time_ids.reshape(-1), size_embed_dim).reshape(time_ids.shape[0], -1)  # (B, 6·E)
    return torch.cat([text_embeds, sizes.to(text_embeds.dtype)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input dtype (ldm `util.GroupNorm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def resblock_norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels, eps=RESBLOCK_NORM_EPS)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (ldm `openaimodel.ResBlock`,
    use_scale_shift_norm=False)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(resblock_norm(channels), nn.SiLU(), conv3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(resblock_norm(out_channels), nn.SiLU(), nn.Identity(),
                                        conv3x3(out_channels, out_channels))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, out, 1, 1) broadcast
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 conv, stride 2, padding 1: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (itself when None) (ldm `attention.CrossAttention`)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, impl: AttentionImpl):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads, self.impl = heads, impl
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (B, S_kv, context_dim)
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, S, d)
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, S_kv, d)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v, self.impl)))  # (B, S, query_dim)


class GEGLU(nn.Module):
    """Gated GELU with exact (erf) GELU (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, S, dim_out) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = FEED_FORWARD_MULT):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, impl: AttentionImpl):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, impl)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, impl)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x  # (B, HW, dim)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the H·W positions of a feature map (ldm `attention.SpatialTransformer`).

    SD1 projects with 1x1 convs before/after flattening; SD2 (`use_linear`) with Linear layers
    after/before it.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, impl: AttentionImpl):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner_dim) if use_linear else nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, impl) for _ in range(depth))
        self.proj_out = nn.Linear(inner_dim, channels) if use_linear else nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        h_ = self.norm(x)  # (B, C, H, W)
        if not self.use_linear:
            h_ = self.proj_in(h_)  # (B, inner, H, W)
        h_ = h_.flatten(2).transpose(1, 2)  # (B, HW, C or inner)
        if self.use_linear:
            h_ = self.proj_in(h_)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.use_linear:
            h_ = self.proj_out(h_)  # (B, HW, C)
        h_ = h_.transpose(1, 2).reshape(b, -1, h, w)  # (B, C or inner, H, W)
        if not self.use_linear:
            h_ = self.proj_out(h_)  # (B, C, H, W)
        return h_ + x


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving ResBlocks the embedding and transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def attention_heads(channels: int, config: UNetConfig) -> tuple[int, int]:
    """(heads, dim_head) at `channels`: fixed heads (SD1) or fixed head width (SD2), as ldm with legacy=False."""
    if config.num_head_channels == -1:
        return config.num_heads, channels // config.num_heads
    return channels // config.num_head_channels, config.num_head_channels


class _Blocks:
    """Block factory for one UNet config: the time-embedding width and attention choice are shared."""

    def __init__(self, config: UNetConfig, impl: AttentionImpl):
        self.config, self.impl = config, impl
        self.emb_channels = config.model_channels * 4

    def res(self, channels: int, out_channels: int) -> ResBlock:
        return ResBlock(channels, self.emb_channels, out_channels)

    def transformer(self, channels: int, depth: int) -> SpatialTransformer:
        heads, dim_head = attention_heads(channels, self.config)
        return SpatialTransformer(channels, heads, dim_head, depth, self.config.context_dim,
                                  self.config.use_linear_in_transformer, self.impl)

    def level(self, channels: int, out_channels: int, level: int) -> list[nn.Module]:
        """A ResBlock, followed by a SpatialTransformer where the level has attention."""
        layers: list[nn.Module] = [self.res(channels, out_channels)]
        if self.config.has_attention(level):
            layers.append(self.transformer(out_channels, self.config.depth_at(level)))
        return layers


def build_input_blocks(blocks: _Blocks) -> tuple[nn.ModuleList, list[int]]:
    """Encoder side; returns the blocks and the channel count of each block's output (the skips)."""
    cfg = blocks.config
    ch = cfg.model_channels
    modules = [TimestepEmbedSequential(conv3x3(cfg.in_channels, ch))]
    skip_channels = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            modules.append(TimestepEmbedSequential(*blocks.level(ch, mult * cfg.model_channels, level)))
            ch = mult * cfg.model_channels
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            modules.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(modules), skip_channels


def build_output_blocks(blocks: _Blocks, skip_channels: list[int]) -> nn.ModuleList:
    """Decoder side: each block takes the previous output concatenated with one skip."""
    cfg = blocks.config
    skips = list(skip_channels)
    ch = skips[-1]
    modules = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            out_ch = mult * cfg.model_channels
            layers = blocks.level(ch + skips.pop(), out_ch, level)
            ch = out_ch
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            modules.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(modules)


def label_embedding(adm_in_channels: int, emb_channels: int) -> nn.Sequential:
    """SDXL's `label_emb` ("sequential" num_classes): y (B, adm) -> (B, emb); keys `0.0.*`, `0.2.*`."""
    return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb_channels), nn.SiLU(),
                                       nn.Linear(emb_channels, emb_channels)))


class UNetModel(nn.Module):
    """ε/v-prediction UNet of Stable Diffusion (Rombach et al. 2022, §3.3; ldm `openaimodel.UNetModel`;
    SDXL: Podell et al. 2023, §2.1-2.2)."""

    def __init__(self, config: UNetConfig, attention: AttentionImpl = AttentionImpl.SDPA):
        super().__init__()
        self.config = config
        blocks = _Blocks(config, attention)
        mc, emb_ch = config.model_channels, blocks.emb_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if config.adm_in_channels:
            self.label_emb = label_embedding(config.adm_in_channels, emb_ch)
        self.input_blocks, skip_channels = build_input_blocks(blocks)
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            blocks.res(ch, ch), blocks.transformer(ch, config.mid_depth), blocks.res(ch, ch))
        self.output_blocks = build_output_blocks(blocks, skip_channels)
        self.out = nn.Sequential(resblock_norm(mc), nn.SiLU(), conv3x3(mc, config.out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_ch, h, w), timesteps (B,), (1,) or () of any numeric dtype, context (B, S, context_dim),
        y (B, adm_in_channels) exactly when the config has adm_in_channels -> (B, out_ch, h, w)."""
        if (y is None) != (not self.config.adm_in_channels):
            raise ValueError(f"this UNet takes y of width {self.config.adm_in_channels}" if self.config.adm_in_channels
                             else "this UNet has no label_emb; pass no y")
        t = timesteps.reshape(-1).float().expand(x.shape[0])  # (B,)
        t_emb = timestep_embedding(t, self.config.model_channels).to(x.dtype)  # (B, mc)
        emb = self.time_embed(t_emb)  # (B, 4·mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))  # (B, 4·mc)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_max, h/2^L, w/2^L)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
