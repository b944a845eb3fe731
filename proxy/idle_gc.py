"""Full garbage collections while no request is in flight.

A long-running proxy holds a large heap of long-lived objects (cached transcripts, context
views, memory indexes). CPython's automatic full (generation 2) collection traverses all of
it, 70-220 ms with the benchmark's full-mode tenant, and it runs inside whichever request
happens to allocate at that moment: those were the slowest requests of a benchmark round.
``serve`` turns the automatic full collection off (``disable_automatic_full_collection``),
and ``IdleCollector`` runs it instead once no request has been in flight for ``idle`` seconds
(``priority.Activity``), at most one every ``min_interval`` seconds. A proxy that is never
idle still collects every ``max_interval`` seconds, so cyclic garbage cannot grow without
bound. The younger generations are collected automatically as before (a few ms each).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time

from proxy.priority import Activity

log = logging.getLogger("agent_state_proxy.gc")

# The automatic threshold of generation 2 once disabled: never reached in practice.
_NEVER = 1 << 30


def disable_automatic_full_collection(young: int = 700, middle: int = 50) -> None:
    """Collect generations 0 and 1 automatically, generation 2 only when asked (process-wide)."""
    gc.set_threshold(young, middle, _NEVER)


class IdleCollector:
    def __init__(self, activity: Activity, idle: float = 0.5, min_interval: float = 60.0, max_interval: float = 900.0) -> None:
        self.activity = activity
        self.idle, self.min_interval, self.max_interval = idle, min_interval, max_interval
        self.collections = 0
        self.last_pause_ms: float | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.min_interval)
            await self.activity.quiet(self.idle, within=self.max_interval - self.min_interval)
            self.collect()

    def collect(self) -> int:
        started = time.perf_counter()
        found = gc.collect()
        # Under load, freed heap accumulates that glibc keeps (~3 MB every 20 s in full mode,
        # ~10 MB after a burst; bench/full_probe.py): returned while the proxy is idle, it does
        # not add to the next busy spell's peak. ~1-2 ms.
        release_freed_memory()
        self.last_pause_ms = (time.perf_counter() - started) * 1000
        self.collections += 1
        log.debug("full collection: %d unreachable objects, %.1f ms", found, self.last_pause_ms)
        return found


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise). No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle_heap() -> None:
    """Once the long-lived structures are built (the memory indexes, at start-up): collect the
    garbage of building them, then freeze what is left so that full collections stop
    traversing it (docs/MEMORY.md has the pause it saved), and
    return the freed heap to the OS."""
    gc.collect()
    gc.freeze()
    release_freed_memory()
