"""Reading one tensor of an ONNX graph from its external-data file, without loading any other.

ONNX external data: a tensor's `external_data` entries name a `location` relative to the graph's
directory, a byte `offset` and a `length`. Shared by the compiler's passes on disk and the runtime's
LoRA swap; onnx is imported only by callers that already hold TensorProtos.
"""
from __future__ import annotations

from pathlib import Path


def external_info(tensor) -> dict[str, str]:
    """A TensorProto's external-data entries as a dict (location, offset, length, ...)."""
    return {entry.key: entry.value for entry in tensor.external_data}


def read_external(tensor, directory: Path) -> bytes:
    """The bytes of an external tensor whose location is relative to `directory`."""
    info = external_info(tensor)
    with open(Path(directory) / info["location"], "rb") as source:
        source.seek(int(info.get("offset", 0)))
        return source.read(int(info["length"]))
