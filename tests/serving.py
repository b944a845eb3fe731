"""Serving an aiohttp app on a local port, on the running loop or from a thread of its own: the
start/stop plumbing shared by the fake providers, the proxy under test and other test servers.

Imports nothing of the proxy, so a fake provider run as a benchmark process stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Coroutine, Iterator, TypeVar

from aiohttp import web

T = TypeVar("T")


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0, *,
                runner: Callable[..., web.AppRunner] = web.AppRunner, shutdown_timeout: float = 60.0,
                before_cleanup: Callable[[], Any] | None = None) -> AsyncIterator[int]:
    """Serve ``app`` on the running loop; yields the port (``port=0``: a free one).
    ``before_cleanup`` runs first at the end (e.g. to release handlers that wait forever)."""
    served = runner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await served.setup()
    try:
        await web.TCPSite(served, host, port).start()
        yield served.addresses[0][1]
    finally:
        if before_cleanup is not None:
            before_cleanup()
        await served.cleanup()


class LoopThread:
    """An event loop of its own in a daemon thread, for sync tests and sync SDK clients."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the thread's loop and wait for its result (its exception raises here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs on the loop, then stop and close it."""
        with contextlib.suppress(Exception):
            self.call(_cancel_the_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


@contextlib.contextmanager
def in_thread(manager: Callable[[], AsyncContextManager[T]], name: str, timeout: float = 30) -> Iterator[T]:
    """Enter the async context manager ``manager()`` on a LoopThread, yield what it yields, and
    exit it there at the end: any async server, used from sync code (a bind error raises here)."""
    thread = LoopThread(name).start()
    try:
        entered = manager()
        value = thread.call(entered.__aenter__(), timeout)
        try:
            yield value
        finally:
            thread.call(entered.__aexit__(None, None, None), timeout)
    finally:
        thread.stop()
