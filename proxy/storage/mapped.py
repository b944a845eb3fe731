"""Give back the pages of a memory-mapped file that this process has read.

LMDB reads through a shared, read-only mapping of its data file: every page a read touches
stays mapped in the process and counts in its RSS until the kernel reclaims it. A bulk read
(the long-term memory's start-up load reads every memory record once) would leave the whole
file mapped: at 100k memories, ~400 MB of RSS for data the proxy has already decoded.
``release_ranges`` drops the process's mappings of such pages (madvise MADV_DONTNEED) in the
address ranges that ``ranges`` found for the file. The file and the page cache are untouched,
so the next read of a page maps it again from the cache: a minor fault, microseconds. Linux
only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("agent_state_proxy.storage")

_MADV_DONTNEED = 4
_libc: ctypes.CDLL | None = None


def release_ranges(found: list[tuple[int, int]]) -> int:
    """Drop the pages mapped in the address ranges ``found`` (from :func:`ranges`, still mapped:
    the caller keeps the mapping in place meanwhile); returns the bytes of mapping covered (0
    where unsupported). Costs about the pages it drops, not the ranges' size (~25 us per MB
    mapped)."""
    if not found or not sys.platform.startswith("linux"):
        return 0
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, end in found:
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
            log.debug("madvise(MADV_DONTNEED) failed: errno %d", ctypes.get_errno())
            continue
        released += end - start
    return released


def ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is mapped shared, from /proc/self/maps (0.9 ms of Python in
    the proxy, so callers keep them while the mapping cannot move). Only shared mappings:
    dropping a page of a private one would discard what the process wrote there."""
    if not sys.platform.startswith("linux"):
        return []
    path = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1].endswith("s") and fields[5].rstrip("\n") == path:
                    start, end = fields[0].split("-")
                    found.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return found


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise
