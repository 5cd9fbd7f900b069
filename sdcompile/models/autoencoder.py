"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3.1).

Parameter names follow ldm's `AutoencoderKL` (checkpoint keys minus `first_stage_model.`), so real
checkpoints load strictly. Images are (B, 3, H, W) in [−1, 1]; latents are (B, embed_dim, H/f, W/f)
with f = 2^(len(ch_mult) − 1), before the recipe's `latent_scale_factor` is applied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcompile.models.attention import AttentionImpl, attention
from sdcompile.recipes import AutoencoderConfig

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv3×3, twice, plus a 1×1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with 1×1 convolutions as projections."""

    def __init__(self, channels: int, attention_impl: AttentionImpl):
        super().__init__()
        self.attention_impl = attention_impl
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (positions_as_sequence(proj(h)) for proj in (self.q, self.k, self.v))  # (B, 1, H·W, C)
        out = attention(q, k, v, self.attention_impl)  # (B, 1, H·W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


def positions_as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H·W, C): one attention head whose tokens are the pixels."""
    return x.flatten(2).transpose(1, 2).unsqueeze(1)


class Downsample(nn.Module):
    """Halves H and W: zero-pad right and bottom by one, then a stride-2 3×3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour repeat, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock → AttnBlock → ResnetBlock at the lowest resolution (keys `mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int, attention_impl: AttentionImpl):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels, attention_impl)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def resnet_chain(channels: list[int]) -> nn.ModuleList:
    """ResnetBlocks channels[0]→channels[1]→…→channels[-1]."""
    return nn.ModuleList(ResnetBlock(c_in, c_out) for c_in, c_out in zip(channels, channels[1:]))


class EncoderLevel(nn.Module):
    """ResnetBlocks at one resolution (`block.N`), then `downsample` unless it is the lowest level."""

    def __init__(self, channels: list[int], downsample: bool):
        super().__init__()
        self.block = resnet_chain(channels)
        self.downsample = Downsample(channels[-1]) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class DecoderLevel(nn.Module):
    """ResnetBlocks at one resolution (`block.N`), then `upsample` unless it is the full-resolution level."""

    def __init__(self, channels: list[int], upsample: bool):
        super().__init__()
        self.block = resnet_chain(channels)
        self.upsample = Upsample(channels[-1]) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2·z_channels, H/f, W/f): the posterior's mean and log-variance."""

    def __init__(self, config: AutoencoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]  # input width of level i is widths[i]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel([widths[i]] + [widths[i + 1]] * config.num_res_blocks, downsample=i < last)
            for i in range(len(config.ch_mult)))
        self.mid = MidBlock(widths[-1], attention_impl)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h·f, w·f).

    `up[i]` works at the resolution of encoder level i, so `up.0` is the full-resolution level and runs last.
    """

    def __init__(self, config: AutoencoderConfig, attention_impl: AttentionImpl):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        bottom = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, bottom, 3, padding=1)
        self.mid = MidBlock(bottom, attention_impl)
        self.up = nn.ModuleList(
            DecoderLevel([widths[min(i + 1, len(widths) - 1)]] + [widths[i]] * (config.num_res_blocks + 1),
                         upsample=i > 0)
            for i in range(len(widths)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), each (B, embed_dim, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std·noise (reparameterisation, Kingma & Welling 2014, §2.4); `noise` ~ N(0, I) like `mean`."""
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig, attention: AttentionImpl = AttentionImpl.SDPA):
        super().__init__()
        self.encoder = Encoder(config, attention)
        self.decoder = Decoder(config, attention)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, in_channels, H, W) in [−1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images (B, out_ch, h·f, w·f), nominally in [−1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode (deterministic)."""
        return self.decode(self.encode(x).mode())
