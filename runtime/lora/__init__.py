"""LoRA files: read (kohya / web-UI and diffusers / PEFT layouts), resolved to our checkpoint keys, and
turned into weight deltas, with numpy only, so the compiler merges them at export and the runtime swaps
them in at load time with the same code.

A LoRA stores, per adapted module, `down` (rank, in[, kh, kw]) and `up` (out, rank[, 1, 1]); the weight
becomes W + scale · (alpha / rank) · up @ down (Hu et al. 2021, eq. 3; kohya's `alpha`, rank when absent).
"""
from sdrun.lora.delta import lora_deltas
from sdrun.lora.file import LoraFile, LoraPair, read_lora
from sdrun.lora.request import LoraRequest, lora_record, parse_lora_option, prompt_lora_tags

__all__ = ["LoraFile", "LoraPair", "LoraRequest", "lora_deltas", "lora_record", "parse_lora_option",
           "prompt_lora_tags", "read_lora"]
