"""Counts a large chat body's messages in a separate process, before this one parses it.

orjson holds the GIL while it parses: a 4 MB body of 100,000 small messages takes ~45 ms on an
idle core and several hundred ms on a loaded one, and the event loop waits that long even when
the parse runs on a worker thread (issue #20 item 2). A body refused for its message count is
parsed only by the probe process, so the proxy's loop never waits for it. The probe is a plain
``python -c`` child (it imports orjson only, nothing of the proxy), started on the first large
body and stopped with the app; bodies go to it one at a time over a pipe.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys

log = logging.getLogger("agent_state_proxy.server")

# The child: reads length-prefixed bodies from stdin, answers each with its message count
# (-1: not JSON, or no messages list; the proxy's own parse then gives the precise 400).
_CHILD = """
import struct, sys
import orjson
read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
while (head := read(8)):
    raw = read(struct.unpack("<Q", head)[0])
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    messages = body.get("messages") if isinstance(body, dict) else None
    write(struct.pack("<q", len(messages) if isinstance(messages, list) else -1))
    sys.stdout.buffer.flush()
"""
_TIMEOUT = 60.0  # seconds for one body; far more than parsing the largest allowed body takes


class BodyProbe:
    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def message_count(self, raw: bytes) -> int | None:
        """How many messages the chat body ``raw`` holds, counted in the probe process; None when
        it is not JSON with a messages list, or the probe is unavailable (the proxy then parses
        and counts the body itself, as without a probe)."""
        async with self._lock:
            try:
                async with asyncio.timeout(_TIMEOUT):
                    process = await self._running()
                    assert process.stdin is not None and process.stdout is not None
                    process.stdin.write(struct.pack("<Q", len(raw)) + raw)
                    await process.stdin.drain()
                    count = struct.unpack("<q", await process.stdout.readexactly(8))[0]
                return count if count >= 0 else None
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.warning("the body probe process failed (%s); counting in the proxy", type(exc).__name__)
                self._kill()
                return None
            except BaseException:  # cancelled mid-exchange: its answer must not be read as the next one's
                self._kill()
                raise

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()

    async def _running(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self._process

    async def close(self) -> None:
        """Stop the probe process (app cleanup); the next large body starts a new one."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()  # end of input: the child exits
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
