"""Helpers shared by the model tests: error statistic, key-layout report, seeded perturbation."""
from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)).item()


def key_mismatch_report(actual: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    misshaped = sorted(f"{k}: ours {actual[k]} vs reference {expected[k]}"
                       for k in set(actual) & set(expected) if actual[k] != expected[k])
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines += [f"{title} ({len(items)}):"] + [f"  {item}" for item in items]
    return "\n".join(lines)


def perturbed_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds seeded noise to every parameter so that norm scales and biases differ from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return module.eval()
