"""How the C heap (glibc malloc, where PyTorch's CPU tensors live) is used: tuned once per process, trimmed often.

Every backbone forward and head step allocates and frees tens of multi-MB maps. glibc's defaults hand blocks above
its (self-raising, at most 32 MB) mmap threshold to fresh mmaps, and give the heap's freed top back to the OS past a
trim threshold, so the same memory is faulted in and zeroed again on every forward. Serving blocks up to 256 MB from
the heap and keeping up to 1 GB of its freed top measured (2-core CPU, shipped recipe): feature extraction ~10 %
faster, REST-sized inference of a 1000 px tile 1.8 s instead of 2.1 s, head steps ~2 %. Memory stays bounded by
``release_free_heap``, which callers run every few images and every epoch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
# a user's own glibc malloc settings win over ours
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only (musl and macOS have neither)
        return libc
    except (OSError, AttributeError):
        return None


def reuse_freed_heap() -> bool:
    """Set the thresholds above for this process (once is enough; idempotent). False where it changed nothing:
    not glibc, or the user set glibc's ``MALLOC_*_`` variables or ``glibc.malloc`` tunables themselves."""
    libc = _libc()
    if libc is None or any(os.environ.get(name) for name in _USER_SETTINGS) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return (bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Freed feature maps stay with the process: extracting 1700 chest X-rays grew it by ~14 MB of anonymous memory per
    image until the kernel killed it at 24 GB. Trimming keeps it flat; it costs the next extraction ~5 % (fresh
    pages), so callers trim every few images (a fixed 1 MB mmap threshold also kept memory flat, but made every
    backbone forward ~35 % slower)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
