"""Atomic file writes: readers see the previous file or the complete new one, never a partial one."""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(temp)` fills a fresh temp file beside `path`, which is then renamed over `path`.

    The temp lies in the same directory (a rename is atomic only within one file system) and is
    created by `write` itself, so the result gets the permissions a plain write would give it. On
    any failure, interrupts included, the temp is removed and `path` is left as it was.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
