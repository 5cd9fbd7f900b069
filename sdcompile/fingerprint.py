"""Content hashes of weights: the bytes of every tensor, whatever its rank or dtype."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

HASHED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the hash order; a recipe hashes those it has


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
        _update(digest, prefix, state)
    return digest.hexdigest()


def _update(digest, prefix: str, state: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in sorted(state.items()):
        digest.update(f"{prefix}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))


class WeightsDigest:
    """`models_sha256` fed one model at a time, in `HASHED_COMPONENTS` order, so the models need not be
    in memory together; `parts` are the models the recipe has (SD: the first three)."""

    def __init__(self, parts: tuple[str, ...]):
        if tuple(p for p in HASHED_COMPONENTS if p in parts) != tuple(parts):
            raise ValueError(f"weights are hashed in the order {HASHED_COMPONENTS}; got {parts}")
        self.parts = tuple(parts)
        self._digest, self._added = hashlib.sha256(), 0

    @property
    def next_part(self) -> str | None:
        return self.parts[self._added] if self._added < len(self.parts) else None

    def add(self, part: str, state: Mapping[str, torch.Tensor]) -> None:
        if part != self.next_part:
            raise ValueError(f"weights are hashed in the order {self.parts}; got {part} for {self.next_part}")
        _update(self._digest, part, state)
        self._added += 1

    def hexdigest(self) -> str:
        if self.next_part is not None:
            raise ValueError(f"{self.next_part} has not been hashed yet")
        return self._digest.hexdigest()


def models_sha256(models) -> str:
    """Content hash of every weight of the models (the bundle's `weights_sha256`)."""
    digest = WeightsDigest(tuple(p for p in HASHED_COMPONENTS if getattr(models, p, None) is not None))
    for part in digest.parts:
        digest.add(part, getattr(models, part).state_dict())
    return digest.hexdigest()
