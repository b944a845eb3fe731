"""Event-loop lag: how late a timer wakes up. A blocked loop delays every request it holds."""

from __future__ import annotations

import asyncio
from typing import Callable


class LoopLag:
    """Sleeps ``interval`` seconds in a loop and measures the overshoot of each sleep: the time
    the loop was busy with something else when the timer was due."""

    def __init__(self, interval: float = 0.1, on_sample: Callable[[float], None] | None = None) -> None:
        self.interval = interval
        self.on_sample = on_sample
        self.last = 0.0  # seconds, the latest sample
        self.max = 0.0  # seconds, the largest since start
        self.samples = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - began - self.interval)
            self.last, self.max, self.samples = lag, max(self.max, lag), self.samples + 1
            if self.on_sample is not None:
                self.on_sample(lag)
