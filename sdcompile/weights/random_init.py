"""Seeded random weights: every parameter a function of (seed, checkpoint key) alone."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
from torch import nn

NORM_JITTER_STD = 0.02  # random norm scales are 1 + N(0, 0.02²), biases N(0, 0.02²)
EMBEDDING_STD = 1.0  # random token/position embeddings are unit-variance, like a LayerNorm'ed stream


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    """Seeded random weights instead of a checkpoint: the same seed gives the same weights."""

    seed: int = 0


def randomize_parameters_(module: nn.Module, seed: int, namespace: str = "") -> nn.Module:
    """Overwrite every parameter with `random_tensor(namespace + name, …)`; buffers keep their values."""
    with torch.no_grad():
        for owner_name, owner in module.named_modules():
            for leaf, parameter in owner.named_parameters(recurse=False):
                name = f"{namespace}{owner_name}.{leaf}" if owner_name else namespace + leaf
                embedding = isinstance(owner, nn.Embedding) or leaf.endswith("embedding")
                parameter.copy_(random_tensor(name, parameter.shape, seed, embedding))
    return module


def random_tensor(name: str, shape: torch.Size | tuple[int, ...], seed: int, embedding: bool = False) -> torch.Tensor:
    """fp32 values for parameter `name`, a function of (seed, name, shape, embedding) alone.

    Embedding tables: N(0, 1); other matrices and kernels: N(0, 1/fan_in), so each layer keeps
    unit-scale activations (LeCun init); 1-D weights (norm scales): 1 + N(0, 0.02²); biases and scalars:
    N(0, 0.02²). No tensor is zero, unlike the original zero-initialised output convolutions.
    """
    generator = torch.Generator().manual_seed(_seed_for(name, seed))
    noise = torch.randn(tuple(shape), generator=generator)
    if len(shape) >= 2:
        return noise.mul_(EMBEDDING_STD if embedding else math.prod(shape[1:]) ** -0.5)
    if len(shape) == 1 and name.endswith("weight"):
        return noise.mul_(NORM_JITTER_STD).add_(1.0)
    return noise.mul_(NORM_JITTER_STD)


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
