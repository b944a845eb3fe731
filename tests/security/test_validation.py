"""Edge validation (issue #20 item 3, issue #30 item 3): malformed bodies are 400s naming the
field in ``param`` — never a 500, never accepted and stored — and oversized requests are refused
with 413 before the proxy works on them."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, ProxyThread, local_config, open_tenant
from tests.memory_helpers import drain
from tests.security.conftest import running_proxy

USER = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def nested(depth: int) -> str:
    """A placeholder ``post`` replaces with a JSON value ``depth`` levels deep, [[[...[1]...]]]
    (orjson, like the proxy's store, cannot write one deeper than 254 levels itself)."""
    return f"@@nested:{depth}@@"


def _expand(raw: bytes) -> bytes:
    return re.sub(rb'"@@nested:(\d+)@@"', lambda m: b"[" * int(m[1]) + b"1" + b"]" * int(m[1]), raw)


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream):
    with running_proxy(tmp_path, open_tenant(upstream.base_url, limits={"max_messages": 50, "max_message_chars": 1000,
                                                                        "max_total_chars": 3000})) as running:
        yield running


def post(proxy: ProxyThread, body: Any, path: str = "/chat/completions", **headers: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else _expand(orjson.dumps(body))
    return httpx.post(proxy.base_url + path, content=content, timeout=30,
                      headers={"Content-Type": "application/json", "X-Session-ID": "edge"} | headers)


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": list(messages or [USER])} | fields


MALFORMED = [
    # (body, param)
    (chat({"role": [], "content": "x"}), "messages[0].role"),
    (chat({"role": 5, "content": "x"}), "messages[0].role"),
    (chat({"role": "user", "content": [{"type": "text", "text": 5}]}), "messages[0].content[0].text"),
    (chat({"role": "user", "content": [1]}), "messages[0].content[0]"),
    (chat({"role": "user", "content": [None]}), "messages[0].content[0]"),
    (chat({"role": "user", "content": []}), "messages[0].content"),
    (chat({"role": "user", "content": [{"text": "no type"}]}), "messages[0].content[0].type"),
    (chat({"role": "user", "content": [{"type": "image_url", "image_url": 5}]}), "messages[0].content[0].image_url"),
    (chat({"role": "user", "content": None}), "messages[0].content"),
    (chat({"role": "user", "content": "x", "name": 5}), "messages[0].name"),
    (chat(USER, {"role": "assistant", "content": None, "tool_calls": [1]}), "messages[1].tool_calls[0]"),
    (chat(USER, {"role": "assistant", "content": None, "tool_calls": [{"function": 5}]}), "messages[1].tool_calls[0].function"),
    (chat(USER, {"role": "assistant", "content": None, "tool_calls": "x"}), "messages[1].tool_calls"),
    (chat(USER, {"role": "assistant", "content": None, "tool_calls": [CALL | {"function": {"name": "f", "arguments": {"a": 1}}}]}),
     "messages[1].tool_calls[0].function.arguments"),
    (chat(USER, {"role": "assistant", "content": None, "function_call": {"name": 5}}), "messages[1].function_call.name"),
    (chat(USER, {"role": "tool", "content": "x", "tool_call_id": 5}), "messages[1].tool_call_id"),
    (chat(tools=[1]), "tools[0]"),
    (chat(tools=[{"type": "function", "function": {"name": 5}}]), "tools[0].function.name"),
    (chat(tools="x"), "tools"),
    (chat(metadata={"user_id": 5}), "metadata.user_id"),
    (chat(metadata={"session_id": 5}), "metadata.session_id"),
    (chat(metadata=[]), "metadata"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=3), "temperature"),
    (chat(stop=[1]), "stop"),
    (chat(logit_bias={"50256": "x"}), "logit_bias"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(response_format={"type": 5}), "response_format.type"),
    (chat(seed=1.5), "seed"),
    ({"model": 5, "messages": [USER]}, "model"),
    ({"model": "fake-model"}, "messages"),
]


@pytest.mark.parametrize(("body", "param"), MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_chat_bodies_are_400_naming_the_field(proxy: ProxyThread, upstream: FakeUpstream, body, param: str) -> None:
    response = post(proxy, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    assert upstream.requests == []  # refused before anything went upstream...
    assert httpx.get(proxy.url + "/admin/sessions/edge").status_code == 404  # ...or was stored


def test_nulls_and_protocol_fields_of_every_kind_are_accepted(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    body = chat(
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        USER,
        temperature=0.2, top_p=None, stop=["x"], max_tokens=50, seed=7, user="u1", logit_bias={"50256": -100},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], tool_choice="auto",
        response_format={"type": "text"}, metadata={"purpose": "test"}, parallel_tool_calls=True,
    )
    response = post(proxy, body)
    assert response.status_code == 200, response.text
    assert upstream.chat_requests[-1]["metadata"] == {"purpose": "test"}


@pytest.mark.parametrize("where", ["message", "tool schema", "tool", "content part"])
def test_json_nested_deeper_than_64_levels_is_refused_anywhere(proxy: ProxyThread, upstream: FakeUpstream, where: str) -> None:
    def body(depth: int) -> dict[str, Any]:
        # The body is level 1, "messages" 2, a message 3: a value inside it adds its own levels.
        return {
            "message": lambda: chat({"role": "user", "content": "hi", "x": nested(depth - 3)}),
            "tool schema": lambda: chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"d": nested(depth - 5)}}}]),
            "tool": lambda: chat(tools=[{"type": "function", "function": {"name": "f"}, "x": nested(depth - 3)}]),
            "content part": lambda: chat({"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": nested(depth - 5)}]}),
        }[where]()

    for depth in (65, 253, 1000):  # 253: the write-queue poison of issue #30
        response = post(proxy, body(depth))
        assert response.status_code == 400, (depth, response.text)
        assert response.json()["error"]["code"] == "nesting_too_deep"
    assert upstream.requests == []
    assert post(proxy, body(64)).status_code == 200  # the limit itself is allowed


def test_the_depth_bound_covers_the_memories_api(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_proxy(tmp_path, open_tenant(upstream.base_url)) as proxy:
        drain(proxy)  # memory starts in the background
        for depth in (64, 251, 252):  # 251-252: accepted before, then every list and search answered 500
            response = post(proxy, {"content": "a fact", "metadata": {"d": nested(depth)}}, "/memories")
            assert response.status_code == 400 and response.json()["error"]["code"] == "nesting_too_deep", response.text
        assert post(proxy, {"content": "a fact", "metadata": {"d": nested(10)}}, "/memories").status_code == 200
        listed = httpx.get(proxy.base_url + "/memories", timeout=30)
        assert listed.status_code == 200 and [m["content"] for m in listed.json()["data"]] == ["a fact"]


def test_an_idempotency_key_that_is_not_utf8_is_400(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    response = post(proxy, chat(), **{"Idempotency-Key": b"key-\xff\xfe"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert post(proxy, chat(), **{"Idempotency-Key": "key-1"}).status_code == 200


def test_embeddings_bodies_are_checked_too(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    for body, param in (({"model": "fake-embedding", "input": 5}, "input"), ({"model": "fake-embedding", "input": []}, "input"),
                        ({"model": "fake-embedding", "input": "x", "dimensions": "8"}, "dimensions"),
                        ({"model": "fake-embedding", "input": "x", "api_base": "http://evil/v1"}, "api_base")):
        response = post(proxy, body, "/embeddings")
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert post(proxy, {"model": "fake-embedding", "input": ["a", "b"], "dimensions": 8}, "/embeddings").status_code == 200


def test_size_limits_are_413_with_a_clear_message(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    cases = [
        (chat(*[USER] * 51), "messages", "at most 50"),
        (chat({"role": "user", "content": "x" * 1001}), "messages[0]", "limit is 1000"),
        (chat({"role": "user", "content": [{"type": "text", "text": "x" * 600}, {"type": "text", "text": "x" * 600}]}), "messages[0]", "limit is 1000"),
        (chat(*[{"role": "user", "content": "x" * 900}] * 4), "messages", "more than 3000"),
    ]
    for body, param, says in cases:
        response = post(proxy, body)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"], error
    assert upstream.requests == []
    assert post(proxy, chat(*[USER] * 50)).status_code == 200


def test_a_50000_pair_request_is_refused_while_health_keeps_answering(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The issue's request (50,000 user/assistant pairs, 4.1 MB, under the body limit) froze the
    whole proxy for 153 s. With the default limits it is refused with 413, and the proxy process
    keeps serving /health meanwhile (the body is parsed off the event loop)."""
    pairs = [m for i in range(50_000) for m in ({"role": "user", "content": f"question {i} about the weather"},
                                                 {"role": "assistant", "content": f"answer {i}: sunny"})]
    body = orjson.dumps({"model": "fake-model", "messages": pairs})
    assert len(body) > 4_000_000
    proxy = ProxyProcess(local_config(tmp_path, upstream.base_url)).start()
    try:
        waits: list[float] = []
        done = threading.Event()

        def poll_health() -> None:
            with httpx.Client(timeout=60) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    assert client.get(proxy.url + "/health").status_code == 200
                    waits.append(time.perf_counter() - started)
                    time.sleep(0.005)

        poller = threading.Thread(target=poll_health)
        poller.start()
        try:
            for _ in range(3):
                response = post(proxy, body)
                assert response.status_code == 413, response.text[:300]
                assert response.json()["error"]["code"] == "too_many_messages"
        finally:
            done.set()
            poller.join(60)
        assert post(proxy, chat()).status_code == 200
    finally:
        assert proxy.stop() == 0
    print(f"/health while refusing 3 x 4.1 MB requests: {len(waits)} probes, max {max(waits) * 1000:.1f} ms")
    assert waits and max(waits) < 2.0  # not a benchmark (a shared machine is noisy): a stalled loop took 153 s here


def test_the_write_queue_poison_of_issue_30_is_refused_and_other_sessions_keep_storing(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Issue #30's request (a message field nested 253 deep, streamed) answered 500 and was queued
    anyway; every later routine turn was lost and every durable write failed. It is now a 400 at
    the edge, and routine and critical turns of other sessions are acknowledged and stored."""
    with running_proxy(tmp_path, open_tenant(upstream.base_url)) as proxy:
        for stream in (True, False):
            poison = chat({"role": "user", "content": "hi", "x": nested(253)}, stream=stream)
            response = post(proxy, poison, **{"X-Session-ID": "poison-s"})
            assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
        for content in ("a routine turn", "I prefer tea"):
            assert post(proxy, chat({"role": "user", "content": content}), **{"X-Session-ID": "after"}).status_code == 200
        stored = httpx.get(proxy.url + "/admin/sessions/after", timeout=30).json()["messages"]
        assert [m["body"]["content"] for m in stored if m["role"] == "user"] == ["a routine turn", "I prefer tea"]
        assert httpx.get(proxy.url + "/admin/sessions/poison-s", timeout=30).status_code == 404


def test_session_headers_and_memory_fields_are_named_in_param(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_proxy(tmp_path, open_tenant(upstream.base_url)) as proxy:
        for header in ("X-Session-ID", "X-User-ID"):
            response = post(proxy, chat(), **{header: b"s-\xff\xfe"})
            assert response.status_code == 400 and response.json()["error"]["param"] == header, response.text
        drain(proxy)
        for path, body, param in (("/memories", {"content": "x", "colour": "red"}, "colour"),
                                  ("/memories", {"content": 5}, "content"),
                                  ("/memories", {"content": "x", "metadata": []}, "metadata"),
                                  ("/memories/search", {"query": "x", "scope": "tenant", "top_k": 0}, "top_k"),
                                  ("/memories/search", {"query": "x", "scope": "user"}, "user_id")):
            response = post(proxy, body, path)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
