"""Long pure-Python passes give the event loop a turn every few milliseconds.

A request with thousands of messages (a new session resent whole) walks every one of them
while reconciling, counting tokens, assembling context and recording, all on the event loop;
in one go that held every other request (and /health) for seconds (issue #20 item 2). A pass
calls ``await pace.tick()`` after each item: it yields only once ``slice`` seconds of work
have gone by, so a normal request (well under a slice) never yields and costs one clock read
per item.
"""

from __future__ import annotations

import asyncio
import time

SLICE = 0.005  # seconds of work between yields: well under the 100 ms /health goal, even at ~10 slices per probe


class Pace:
    def __init__(self, slice: float = SLICE) -> None:
        self.slice = slice
        self._due = time.perf_counter() + slice

    async def tick(self) -> None:
        """Yield to the event loop when this pass has run for a slice since its last yield."""
        now = time.perf_counter()
        if now >= self._due:
            await asyncio.sleep(0)
            self._due = time.perf_counter() + self.slice
