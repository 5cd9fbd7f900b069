"""Scaled dot-product attention, with the implementation chosen per model instance.

`SDPA` calls `torch.nn.functional.scaled_dot_product_attention`; torch's ONNX exporter lowers it
to the standard `Attention` operator at opset >= 23. `EXPLICIT` spells out
MatMul → Mul(scale) → [Add(causal mask)] → Softmax → MatMul, the pattern older exporters and
third-party graphs contain, which our fused-attention pass recognises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sdcompile.options import AttentionImpl

__all__ = ["AttentionImpl", "attention", "causal_mask", "merge_heads", "split_heads"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: AttentionImpl,
              causal: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√d [+ causal mask])·v over (B, heads, S, d) tensors (Vaswani et al. 2017, eq. 1)."""
    if impl is AttentionImpl.SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, heads, Sq, Sk)
    if causal:
        scores = scores + causal_mask(q.shape[-2], k.shape[-2], scores.dtype, scores.device)
    return torch.matmul(scores.softmax(dim=-1), v)


def causal_mask(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) additive mask: 0 on and below the diagonal, −inf above."""
    return torch.full((q_len, k_len), float("-inf"), dtype=dtype, device=device).triu(1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads·d) -> (B, heads, S, d)."""
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, d) -> (B, S, heads·d)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)
