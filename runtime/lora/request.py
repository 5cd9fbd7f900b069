"""What the user asks for: `FILE[:SCALE]` options and `<lora:NAME:SCALE>` prompt tags."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from sdrun.errors import UserError

DEFAULT_SCALE = 1.0
SUFFIX = ".safetensors"
# The web UIs' extra-network syntax: <lora:NAME> or <lora:NAME:SCALE>.
PROMPT_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>")


@dataclasses.dataclass(frozen=True)
class LoraRequest:
    path: Path
    scale: float = DEFAULT_SCALE

    @property
    def name(self) -> str:
        return self.path.stem


def parse_lora_option(text: str) -> LoraRequest:
    """`FILE` or `FILE:SCALE` (the last colon splits, so Windows drive letters and paths with colons work
    when a scale is given)."""
    path, colon, scale = text.rpartition(":")
    if not colon or "/" in scale or "\\" in scale or scale.endswith(SUFFIX):
        return LoraRequest(Path(text))
    return LoraRequest(Path(path), _scale(scale, f"--lora {text}"))


def _scale(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"the LoRA scale in {where!r} is not a number.", expected="FILE[:SCALE], SCALE a finite "
                        "number such as 0.7 or -0.3", got=repr(text), fix="write the scale as a decimal number")
    return value


def prompt_lora_tags(prompt: str, lora_dir: Path | None) -> tuple[str, list[LoraRequest]]:
    """The prompt without its `<lora:NAME:SCALE>` tags, and the LoRAs they name (`lora_dir`/NAME.safetensors)."""
    tags = PROMPT_TAG.findall(prompt)
    if not tags:
        return prompt, []
    if lora_dir is None:
        raise UserError(f"the prompt names LoRAs ({', '.join(f'<lora:{n}>' for n, _ in tags)}) and no directory "
                        "to find them in was given.", fix="add --lora-dir DIR (DIR/NAME.safetensors per tag)")
    requests = [LoraRequest(Path(lora_dir) / f"{name}{SUFFIX}",
                            _scale(scale, f"<lora:{name}:{scale}>") if scale else DEFAULT_SCALE)
                for name, scale in tags]
    return " ".join(PROMPT_TAG.sub(" ", prompt).split()), requests


def lora_record(request: LoraRequest, sha256: str, touched: dict[str, int]) -> dict:
    """What a manifest or a PNG records of an applied LoRA; `touched`: model -> tensors changed."""
    return {"file": request.path.name, "sha256": sha256, "scale": request.scale, "tensors": touched}
