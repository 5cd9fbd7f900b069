"""The exact state_dict keys and shapes of real SD checkpoints, read from tests/data/sd_checkpoint_keys.txt.

The file has one section per model (`### <title>: ...`) followed by `<key> [d0, d1, ...]` lines.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

KEYS_FILE = Path(__file__).resolve().parent.parent / "data" / "sd_checkpoint_keys.txt"

SECTION_TITLES = {
    "sd1_unet": "SD1 UNet",
    "sd2_unet": "SD2 UNet",
    "vae": "VAE",
    "sd1_text": "SD1 FrozenCLIPEmbedder",
    "sd2_text": "SD2 FrozenOpenCLIPEmbedder",
}
PREFIXES = {
    "sd1_unet": "model.diffusion_model.",
    "sd2_unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "sd1_text": "cond_stage_model.",
    "sd2_text": "cond_stage_model.",
}
_LINE = re.compile(r"^(\S+) \[([0-9, ]*)\]$")


@lru_cache(maxsize=None)
def _sections() -> dict[str, dict[str, tuple[int, ...]]]:
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:].split(" (")[0].split(":")[0], {})
            continue
        match = _LINE.match(line)
        if match and current is not None:
            dims = tuple(int(d) for d in match.group(2).split(",") if d.strip())
            current[match.group(1)] = dims
    return sections


def reference_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape for `model` (a key of SECTION_TITLES), with the checkpoint prefix removed."""
    prefix = PREFIXES[model]
    section = _sections()[SECTION_TITLES[model]]
    return {key[len(prefix):]: shape for key, shape in section.items()}
