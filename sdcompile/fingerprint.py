"""Content hashes of weights: the bytes of every tensor, whatever its rank or dtype."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

HASHED_COMPONENTS = ("unet", "vae", "text_encoder")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in row-major order as raw little-endian bytes.

    Works for every rank (0-dim scalars such as OpenCLIP's `logit_scale` included) and every dtype
    (bf16, which numpy cannot hold, included): the tensor is flattened to 1-D before being viewed as bytes.
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """dtype, shape and sha256 of the bytes: equal exactly when two tensors are bit-identical."""
    return f"{tensor.dtype}:{tuple(tensor.shape)}:{hashlib.sha256(tensor_bytes(tensor)).hexdigest()}"


def state_dict_sha256(named: Iterable[tuple[str, Mapping[str, torch.Tensor]]]) -> str:
    """One hash over (prefix, state_dict) pairs: every key's name, dtype, shape and bytes, keys sorted."""
    digest = hashlib.sha256()
    for prefix, state in named:
        for key, tensor in sorted(state.items()):
            digest.update(f"{prefix}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def models_sha256(models) -> str:
    """Content hash of every weight of the three models (the bundle's `weights_sha256`)."""
    return state_dict_sha256((part, getattr(models, part).state_dict()) for part in HASHED_COMPONENTS)
