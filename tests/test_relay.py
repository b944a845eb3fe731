"""The SSE relay every streaming endpoint shares (proxy/server/relay.py), over real HTTP: the
stream's last event only once the turn is recorded, the protocol's error event otherwise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, AsyncIterator

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.errors import ProxyError, UpstreamError
from proxy.protocols import responses_render as render
from proxy.quotas import Quotas
from proxy.server import keys
from proxy.server.messages_routes import _MessagesFrames
from proxy.server.relay import relay
from proxy.server.responses_routes import _ResponsesFrames
from proxy.server.routes import _ChatFrames

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}


class _Pipeline:
    """The pipeline's stream as the relay sees it: batches, then the record step when closed."""

    def __init__(self, batches: list[list[dict[str, Any]]], fail_after: int | None = None, record_fails: bool = False) -> None:
        self.batches, self.fail_after, self.record_fails = batches, fail_after, record_fails
        self.recorded: list[str] = []

    async def stream(self, turn: Any) -> AsyncIterator[list[dict[str, Any]]]:
        outcome = "aborted"
        try:
            for n, batch in enumerate(self.batches):
                if n == self.fail_after:
                    raise UpstreamError("the provider failed mid-stream", status=502)
                yield batch
            outcome = "ok"
        except ProxyError:
            outcome = "error"
            raise
        finally:
            self.recorded.append(outcome)
            if self.record_fails:
                raise ProxyError("the proxy could not persist this turn; it was not acknowledged", status=503, code="storage_error")


def _turn() -> Any:
    return SimpleNamespace(headers={"X-Session-ID": "s"}, ref=SimpleNamespace(id="s"), request_id="req-1",
                           tenant=SimpleNamespace(name="local"), usage=None)


async def _relayed(pipeline: _Pipeline, frames: Any) -> tuple[int, bytes]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await relay(request, pipeline, _turn(), frames)  # type: ignore[arg-type]
        except ProxyError as error:  # before the first event: a normal HTTP error
            return web.json_response(error.body(), status=error.status)

    app = web.Application()
    app[keys.QUOTAS] = Quotas({}, None)  # type: ignore[arg-type]
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/")
        return response.status, await response.read()


async def test_the_stream_ends_only_once_the_turn_is_recorded() -> None:
    pipeline = _Pipeline([[CHUNK], [CHUNK]])
    status, body = await _relayed(pipeline, _ChatFrames())
    assert status == 200 and body == b"data: " + orjson.dumps(CHUNK) + b"\n\n" + b"data: " + orjson.dumps(CHUNK) + b"\n\n" + b"data: [DONE]\n\n"
    assert pipeline.recorded == ["ok"]


async def test_a_turn_that_cannot_be_recorded_ends_with_the_protocols_error_event() -> None:
    status, chat = await _relayed(_Pipeline([[CHUNK]], record_fails=True), _ChatFrames())
    assert status == 200 and b"[DONE]" not in chat and b"storage_error" in chat.split(b"\n\n")[-2]

    renderer = render.StreamRenderer("resp_1", {}, "m", 0, {})
    status, responses = await _relayed(_Pipeline([[CHUNK]], record_fails=True), _ResponsesFrames(renderer))
    assert status == 200 and b"response.failed" in responses and b"response.completed" not in responses

    stop = {"type": "message_stop"}
    status, messages = await _relayed(_Pipeline([[{"type": "message_start"}, stop]], record_fails=True), _MessagesFrames())
    assert status == 200 and b"message_stop" not in messages and b'"type":"error"' in messages


async def test_the_held_back_message_stop_is_sent_once_recorded() -> None:
    stop = {"type": "message_stop"}
    status, body = await _relayed(_Pipeline([[{"type": "message_start"}, stop]]), _MessagesFrames())
    assert status == 200 and body.rstrip().endswith(b'"type":"message_stop"}')


async def test_a_failure_before_the_first_event_is_an_http_error_and_after_it_an_error_event() -> None:
    pipeline = _Pipeline([[CHUNK]], fail_after=0)
    status, body = await _relayed(pipeline, _ChatFrames())
    assert status == 502 and b"mid-stream" in body and pipeline.recorded == ["error"]

    pipeline = _Pipeline([[CHUNK], [CHUNK]], fail_after=1)
    status, body = await _relayed(pipeline, _ChatFrames())
    assert status == 200 and b"mid-stream" in body.split(b"\n\n")[-2] and b"[DONE]" not in body
    assert pipeline.recorded == ["error"]

    pipeline = _Pipeline([[CHUNK], [CHUNK]], fail_after=1, record_fails=True)  # nor was its partial answer recorded
    status, body = await _relayed(pipeline, _ChatFrames())
    assert status == 200 and b"storage_error" in body.split(b"\n\n")[-2] and b"[DONE]" not in body
