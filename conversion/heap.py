"""Handing freed tensor memory back to the operating system while a conversion streams.

glibc serves an allocation above its mmap threshold with its own mapping, returned on free, but raises the
threshold to the size of each such block freed, after which same-sized tensors come from the heap and freed
ones stay there. A converter allocates and frees one layer's tensors after another, so the heap's free
space adds to what the process holds, uneven with the model's shapes. Trimming after each tensor is written
returns it, and costs a few microseconds per tensor; elsewhere (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Returns the free memory of the malloc heap to the system (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
