"""SDXL's extra conditioning vector y: pooled text and six image sizes (Podell et al. 2023, §2.2).

y = [pooled text (P), emb(original h), emb(original w), emb(crop top), emb(crop left), emb(target h),
emb(target w)], each emb the 256-wide sinusoidal embedding of the UNet's timestep (cos first, frequencies
10000^(−i/half)); the UNet's `label_emb` MLP maps y to the width of the timestep embedding and adds it.
The runtime feeds the six values (`SizeConditioning`, the UNet graph's `time_ids`) and the exported graph
embeds them; `conditioning_vector` states y independently in numpy (float64), which the tests hold both
the graph's embedding and diffusers' against.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

SIZE_VALUES = 6  # original (h, w), crop (top, left), target (h, w)
SIZE_EMBED_DIM = 256
MAX_PERIOD = 10000


class SizeConditioning(NamedTuple):
    """Pixel sizes the UNet is told about; SDXL's pipeline default is original = target = image, crop 0."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    target_height: int
    target_width: int

    @classmethod
    def for_image(cls, height: int, width: int) -> SizeConditioning:
        return cls(height, width, 0, 0, height, width)


def sinusoidal_embedding(values: np.ndarray, dim: int, max_period: int = MAX_PERIOD) -> np.ndarray:
    """(N,) -> (N, dim) float32, [cos(v·f), sin(v·f)] with f = max_period^(−i/half), i < half = dim // 2
    (Vaswani et al. 2017, §3.5); an odd `dim` ends in a zero column."""
    half = dim // 2
    # In float64: fp32 implementations (torch's, diffusers') round each argument v·f to about one fp32 ulp
    # of v, which the embedding inherits; this one is closer to exact than either.
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)  # (half,)
    args = np.asarray(values, dtype=np.float64)[:, None] * freqs[None]  # (N, half)
    embedding = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)


def conditioning_vector(pooled_text: np.ndarray, sizes: SizeConditioning | np.ndarray,
                        embed_dim: int = SIZE_EMBED_DIM) -> np.ndarray:
    """pooled_text (B, P), sizes six values or (B, 6) -> y (B, P + 6·embed_dim) float32."""
    pooled_text = np.asarray(pooled_text, dtype=np.float32)
    batch = pooled_text.shape[0]
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.float32), (batch, SIZE_VALUES))
    size_embeddings = sinusoidal_embedding(sizes.reshape(-1), embed_dim).reshape(batch, -1)  # (B, 6·embed_dim)
    return np.concatenate([pooled_text, size_embeddings], axis=-1)
