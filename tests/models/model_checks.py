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


def sdxl_added_conditioning(config, batch: int = 2, generator: torch.Generator | None = None):
    """Pooled text (B, P) and size values (B, 6) for a UNet config with `label_emb`, as diffusers takes them
    (`added_cond_kwargs`), and our y (B, adm) from them by the independent numpy statement."""
    from sdrun.sdxl_conditioning import SIZE_VALUES, SizeConditioning, conditioning_vector

    generator = generator or torch.Generator().manual_seed(2)
    pooled = torch.randn(batch, config.adm_in_channels - SIZE_VALUES * config.size_embed_dim, generator=generator)
    sizes = torch.tensor([SizeConditioning(1024, 768, 0, 0, 1024, 1024),
                          SizeConditioning(512, 512, 32, 16, 768, 1024)][:batch], dtype=torch.float32)
    y = torch.from_numpy(conditioning_vector(pooled.numpy(), sizes.numpy(), config.size_embed_dim))
    return {"text_embeds": pooled, "time_ids": sizes}, y
