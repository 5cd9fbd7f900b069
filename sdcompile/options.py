"""The choices a user makes, as enums, and their defaults: one place, no heavy imports."""
from __future__ import annotations

import enum

ATTENTION_OPSET = 23  # first opset with the standard Attention operator
DEFAULT_OPSET = ATTENTION_OPSET


class Precision(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # fp16 weights and activations with fp32 islands (passes/fp16.py)


class AttentionImpl(enum.Enum):
    """How the PyTorch reference computes attention (chosen per model instance)."""

    SDPA = "sdpa"  # F.scaled_dot_product_attention; exports as ONNX Attention at opset >= 23
    EXPLICIT = "explicit"  # MatMul → Mul(scale) → Softmax → MatMul, fused later by our pass


class AttentionTarget(enum.Enum):
    """Which fused operator the attention pass emits."""

    ONNX = "onnx"  # standard Attention (opset 23): ONNX Runtime CPU >= 1.23, TensorRT >= 10.14
    ORT_MHA = "ort-mha"  # com.microsoft.MultiHeadAttention for ONNX Runtime's CUDA provider
