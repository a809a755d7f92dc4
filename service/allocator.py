"""Give big freed buffers back to the OS: a decoded 4000² upload must not stay resident.

glibc serves allocations above M_MMAP_THRESHOLD with mmap and unmaps them on free, but by default
it raises that threshold to the size of every mmapped block freed (up to 32 MiB on 64-bit), so
after the first large image every later raster comes from the heap and stays resident when freed.
Pinning the threshold turns that adjustment off; `python -m benchmarks.abuse memory` reports the
resident memory left after each burst of uploads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("vqtok.service")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold); False (and nothing changed) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl (Alpine) and macOS have no mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning(
            "mallopt(M_MMAP_THRESHOLD, %d) failed: freed rasters may stay resident", threshold
        )
    return ok
