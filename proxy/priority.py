"""Requests first: background CPU work (indexing embeddings) pauses while a request is prepared.

On a small machine the local embedder indexing recorded messages and a request's own work
(its query embedding, retrieval, context assembly) compete for the same cores and the GIL.
A request marks its foreground section; background work calls ``pause_for_requests`` at safe
points (between the embedder's layers) and waits there while a request is in one, but never
longer than ``max_pause`` after the newest request began: a request still in its section by
then is waiting on I/O (a summarizer model), not using the CPU, and under a steady stream of
requests background work still advances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Callable, Iterator

MAX_PAUSE = 0.2  # seconds after a request began that background work keeps out of its way


class ForegroundGate:
    def __init__(self, max_pause: float = MAX_PAUSE) -> None:
        self.max_pause = max_pause
        self._active = 0
        self._newest = 0.0  # time.monotonic() when the newest request section began
        self._idle = threading.Condition()
        self.pauses = 0  # background waits that found a request in progress (stats)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark a request's foreground section (any thread; nests and overlaps)."""
        with self._idle:
            self._active += 1
            self._newest = time.monotonic()
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def pause_for_requests(self) -> None:
        """Called by background work at a safe point: wait while a request is in progress."""
        if not self._active:  # the common case, without taking the lock
            return
        with self._idle:
            remaining = self._newest + self.max_pause - time.monotonic()
            if self._active and remaining > 0:
                self.pauses += 1
                self._idle.wait_for(lambda: not self._active, timeout=remaining)


requests = ForegroundGate()  # one per process: the cores are shared by every tenant


class Activity:
    """HTTP requests in flight, whole requests (the upstream call included), and when the last
    one ended. Work that holds the event loop or the GIL for tens of milliseconds or more (a
    full garbage collection, writing the vector index) waits for a quiet moment: an agent's
    proxy mostly waits on the model, so there are such moments. Event-loop thread only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self._last_busy = clock()

    def started(self) -> None:
        self.in_flight += 1

    def ended(self) -> None:
        self.in_flight -= 1
        self._last_busy = self.clock()

    def quiet_for(self, seconds: float) -> bool:
        """No request in flight, and none for ``seconds``."""
        return not self.in_flight and self.clock() - self._last_busy >= seconds

    async def quiet(self, seconds: float, within: float, poll: float = 0.05) -> bool:
        """Wait until ``quiet_for(seconds)``, but at most ``within`` seconds; whether it is."""
        deadline = self.clock() + within
        while not self.quiet_for(seconds):
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True


activity = Activity()  # one per process, like ``requests``: the event loop is shared


def background_thread() -> None:
    """Run the calling thread only on CPU time nothing else wants (a ThreadPoolExecutor
    ``initializer`` for background workers): Linux's SCHED_IDLE policy, and nice 19 where that
    policy is missing. Both are per thread on Linux; elsewhere, or where not allowed, this does
    nothing.

    SCHED_IDLE rather than nice 19 alone: the scheduler then counts a core running only such
    threads as idle, so a request's thread that wakes up takes that core at once instead of
    queueing behind another request's thread, and a nice-19 thread still gets ~1.5 % of a
    busy core where a SCHED_IDLE one gets ~0.3 %. Not for work that holds the GIL for long
    (see ``low_priority_thread``)."""
    low_priority_thread()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread
    except (AttributeError, OSError):
        pass


def low_priority_thread() -> None:
    """Nice 19 only (a ThreadPoolExecutor ``initializer``): for background work that holds the
    GIL for long stretches, such as writing the usearch index. A SCHED_IDLE thread preempted
    while holding the GIL would stall the event loop until a core fell idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
