"""Counts a large chat body's messages in a separate process, before this one parses it.

orjson holds the GIL while it parses: a 4 MB body of 100,000 small messages takes ~45 ms on an
idle core and several hundred ms on a loaded one, and the event loop waits that long even when
the parse runs on a worker thread (issue #20 item 2). A body refused for its message count is
parsed only by the probe process, so the proxy's loop never waits for it. The probe starts on
the first large body (``spawn``: nothing of this process is copied) and stops with the app.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import orjson

log = logging.getLogger("agent_state_proxy.server")
_pool: ProcessPoolExecutor | None = None


def count_messages(raw: bytes) -> int | None:
    """How many messages a chat body holds; None when it is not JSON with a ``messages`` list
    (the proxy's own parse then gives the precise 400). Runs in the probe process."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    messages = body.get("messages") if isinstance(body, dict) else None
    return len(messages) if isinstance(messages, list) else None


async def message_count(raw: bytes) -> int | None:
    """``count_messages(raw)``, in the probe process; None when the probe is unavailable (the
    body is then parsed and counted here, as without a probe)."""
    global _pool
    try:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return await asyncio.get_running_loop().run_in_executor(_pool, count_messages, raw)
    except (BrokenProcessPool, OSError, RuntimeError) as exc:  # killed, cannot start, shut down meanwhile
        log.warning("the body probe process is unavailable (%s); counting in the proxy", type(exc).__name__)
        _pool = None
        return None


def shutdown() -> None:
    """Stop the probe process (app cleanup); the next large body starts a new one."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None
