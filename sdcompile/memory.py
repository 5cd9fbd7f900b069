"""The process's memory: handing freed memory back so the next phase's peak starts from what is really
alive; the resident and peak readers are the runtime's (`sdrun.host_memory`), re-exported here."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

from sdrun.host_memory import peak_gib, resident_gib

__all__ = ["peak_gib", "resident_gib", "return_freed_memory"]  # the readers live in the runtime


def return_freed_memory() -> None:
    """Collect what was freed and hand glibc's freed heap pages back to the system (`malloc_trim`;
    elsewhere nothing to do)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
