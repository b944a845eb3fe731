"""The SSE relay every streaming endpoint shares: when a stream starts, ends, fails or is abandoned.

A protocol supplies only its wire format (``Frames``). The rules are the same for all: an error
before the first event is a normal HTTP error; after it, the protocol's error event ends the
stream. The stream's last event (``[DONE]``, ``response.completed``, ``message_stop``) is sent only
once the turn is recorded, so a client that saw it holds an answer the proxy has accepted; if
recording fails the stream ends with the error event instead. A client that goes away closes the
provider's stream, and what arrived until then is recorded as aborted.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

from aiohttp import web

from proxy.errors import ProxyError
from proxy.pipeline import Pipeline
from proxy.server import keys
from proxy.turn import Turn

log = logging.getLogger("agent_state_proxy.server")


class Frames(Protocol):
    """One protocol's stream, as bytes on the wire."""

    def start(self) -> bytes:
        """What opens the stream, sent with the first batch."""

    def batch(self, batch: list[dict[str, Any]]) -> bytes:
        """A batch of the exchange's stream events, as they arrived together."""

    def end(self) -> bytes:
        """The stream's last bytes, once the turn is recorded."""

    def fail(self, error: ProxyError) -> bytes:
        """The error event that ends a stream that failed after it started."""


async def relay(request: web.Request, pipeline: Pipeline, turn: Turn, frames: Frames) -> web.StreamResponse:
    """Stream the turn's answer to the client; the pipeline records it however the stream ends.
    The tenant's daily tokens are counted after the client has its answer."""
    batches = pipeline.stream(turn)
    response: web.StreamResponse | None = None
    failure: ProxyError | None = None
    gone = False
    try:
        async for batch in batches:
            data = b""
            if response is None:
                response = await _begin(request, turn)
                data = frames.start()
            await response.write(data + frames.batch(batch))  # one send for what arrived together
        if response is None:  # the provider sent no event at all: still a well-formed stream
            response = await _begin(request, turn)
            await response.write(frames.start())
    except ProxyError as error:
        if response is None:
            raise
        failure = error
    except (ConnectionResetError, ConnectionError):
        log.info("client went away mid-stream (session %s, request %s)", turn.ref.id, turn.request_id)
        gone = True
    finally:
        try:
            await batches.aclose()  # records the (possibly partial) response
        except ProxyError as error:
            if response is None:
                raise
            failure = failure or error
    if response is not None:
        last = b"" if gone else frames.fail(failure) if failure is not None else frames.end()
        with contextlib.suppress(ConnectionResetError, ConnectionError):
            await response.write_eof(last)
    await request.app[keys.QUOTAS].add_tokens(turn.tenant.name, turn.usage)
    return response


async def _begin(request: web.Request, turn: Turn) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers})
    await response.prepare(request)
    return response
