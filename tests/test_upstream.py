"""The upstream client (proxy/upstream.py) against a handler function: what it sends to the
provider, and how every provider failure comes out as one UpstreamError. End-to-end behaviour
through the proxy is tested against the fake servers (tests/fake_upstream.py and friends)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config import ResolvedModel
from proxy.errors import BadRequest, UpstreamError
from tests.harness import handler_upstream

KEY = "sk-provider-secret-0123456789"


def route(model: str = "openai/gpt-test", api_base: str = "http://provider.test/v1", **extra: Any) -> ResolvedModel:
    return ResolvedModel(requested="gpt", model=model, upstream_model=model.split("/", 1)[1], api_base=api_base,
                         api_key=KEY, direct=True, params={}, **extra)


BODY = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
REPLY = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}


async def test_a_chat_request_goes_to_the_routes_provider_with_its_key_and_model() -> None:
    seen: list[tuple[str, str, str | None, dict[str, Any]]] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        seen.append((request.host, request.path, request.headers.get("Authorization"), await request.json()))
        return web.json_response(REPLY)

    async with handler_upstream(handler) as upstream:
        reply = await upstream.complete(route(), BODY | {"temperature": 0.5}, timeout=5)
    assert reply == REPLY
    [(host, path, auth, sent)] = seen
    assert (host, path, auth) == ("provider.test", "/v1/chat/completions", f"Bearer {KEY}")
    assert sent == {"model": "gpt-test", "messages": BODY["messages"], "temperature": 0.5}


async def test_a_field_outside_the_allow_list_never_reaches_the_provider() -> None:
    calls = []

    async def handler(request: web.BaseRequest) -> web.Response:
        calls.append(request.path)
        return web.json_response(REPLY)

    async with handler_upstream(handler) as upstream:
        with pytest.raises(BadRequest):
            await upstream.complete(route(), BODY | {"api_base": "http://evil.test"}, timeout=5)
        # The tenant's passthrough fields do travel.
        await upstream.complete(route(passthrough=frozenset({"vendor_flag"})), BODY | {"vendor_flag": 1}, timeout=5)
    assert calls == ["/v1/chat/completions"]


async def test_a_provider_error_keeps_its_status_and_retry_after_and_never_shows_the_key() -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.json_response({"error": {"message": f"rate limited for key {KEY}", "code": "rate_limit_exceeded"}},
                                 status=429, headers={"Retry-After": "7"})

    async with handler_upstream(handler, secrets=(KEY,)) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.complete(route(), BODY, timeout=5)
    error = caught.value
    assert (error.status, error.provider_status, error.code) == (429, 429, "rate_limit_exceeded")
    assert error.headers == {"Retry-After": "7"}
    assert "rate limited" in error.message and KEY not in error.message


async def test_a_reply_over_the_tenants_byte_limit_is_refused() -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.json_response(REPLY | {"padding": "x" * 5000})

    async with handler_upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.complete(route(max_response_bytes=1000), BODY, timeout=5)
    assert caught.value.code == "upstream_response_too_large"


async def test_a_provider_slower_than_the_timeout_is_a_504() -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response(REPLY)

    async with handler_upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.complete(route(), BODY, timeout=0.2)
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


async def _sse(request: web.BaseRequest, pieces: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
        await asyncio.sleep(0.01)  # separate network reads
    return response


def _chunk(i: int) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}


async def test_a_chat_stream_yields_every_chunk_in_order_across_reads() -> None:
    stream = b"".join(b"data: " + orjson.dumps(_chunk(i)) + b"\n\n" for i in range(5)) + b"data: [DONE]\n\n"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _sse(request, [stream[:30], stream[30:100], stream[100:]])

    async with handler_upstream(handler) as upstream:
        batches = [batch async for batch in upstream.stream(route(), BODY | {"stream": True}, timeout=5)]
    assert [c for batch in batches for c in batch] == [_chunk(i) for i in range(5)]


async def test_a_chat_stream_cut_before_done_is_an_interrupted_upstream() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _sse(request, [b"data: " + orjson.dumps(_chunk(0)) + b"\n\n"])

    async with handler_upstream(handler) as upstream:
        received = []
        with pytest.raises(UpstreamError) as caught:
            async for batch in upstream.stream(route(), BODY | {"stream": True}, timeout=5):
                received += batch
    assert received == [_chunk(0)]
    assert (caught.value.status, caught.value.code) == (502, "upstream_interrupted")


async def test_a_messages_stream_relays_what_came_before_an_error_event_then_raises_its_type() -> None:
    events = [{"type": "message_start", "message": {"id": "m1"}}, {"type": "ping"},
              {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    body = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    seen = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("x-api-key"), request.headers.get("anthropic-version")))
        return await _sse(request, [body])

    received = []
    async with handler_upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            async for batch in upstream.anthropic_stream(route("anthropic/claude-test", "http://anthropic.test"),
                                                         {"max_tokens": 10, "messages": []}, {}, timeout=5):
                received += batch
    assert seen == [("/v1/messages", KEY, "2023-06-01")]
    assert received == events[:2]
    assert caught.value.code == "overloaded_error" and "Overloaded" in caught.value.message


async def test_a_messages_stream_without_message_stop_is_an_interrupted_upstream() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _sse(request, [b'data: {"type": "message_start", "message": {}}\n\n'])

    async with handler_upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            async for _ in upstream.anthropic_stream(route("anthropic/claude-test", "http://anthropic.test"), {}, {}, timeout=5):
                pass
    assert caught.value.code == "upstream_interrupted"


async def test_close_leaves_an_injected_session_to_its_owner() -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.json_response(REPLY)

    async with handler_upstream(handler) as upstream:
        await upstream.close()  # the session is the harness's: still usable
        assert await upstream.complete(route(), BODY, timeout=5) == REPLY
