"""Giving freed memory back to the operating system between blocks.

glibc's ``malloc`` keeps freed heap memory for reuse instead of returning it, and a block's temporaries (a fp32
weight copy per Linear, observer samples, search products) are freed in an order that leaves the heap
fragmented: most of the resident memory between two blocks is then free heap that the next block's peak
starts from (measured by ``benchmarks/scale.py``; see benchmarks/RESULTS.md). ``malloc_trim(0)`` returns the free heap pages; where it does not
exist (macOS, musl, Windows) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); whether that was possible here."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
