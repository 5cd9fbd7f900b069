"""The `.safetensors` extent check lives in the runtime (LoRA files are read there too); re-exported here."""
from sdrun.safetensors_extent import REDOWNLOAD_FIX, TensorExtent, check_safetensors_extent, read_header

__all__ = ["REDOWNLOAD_FIX", "TensorExtent", "check_safetensors_extent", "read_header"]
