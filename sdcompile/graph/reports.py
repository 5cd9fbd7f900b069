"""Pass reports as plain data (dicts, lists, str, int, float, bool) for manifests and the CLI."""
from __future__ import annotations

import dataclasses
import enum


def plain_data(value):
    """Dataclasses -> dicts, enums -> their values, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    return value
