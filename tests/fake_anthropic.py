"""Fake Anthropic Messages provider: a real local aiohttp server that speaks /v1/messages.

It answers JSON and SSE with every event type (message_start, content_block_start/delta/stop with
text, thinking + signature, tool use, message_delta, message_stop, ping, and one event type no SDK
knows), checks requests as strictly as the real API where it matters here (the key, every
tool_use answered by a tool_result in the next turn, thinking signatures intact), and records the
exact bytes of every request.

Behaviour by the last user text: ``CALL_TOOL:<name>`` asks for that tool; ``FAIL_MIDSTREAM``
sends an ``error`` event after the first delta. A request with ``thinking`` gets a signed
thinking block first. A user turn of tool results is answered with the results' text.

    with FakeAnthropic.run_in_thread(api_key="k") as fake:
        proxy route: {"model": "anthropic/claude-x", "api_base": fake.base_url, "api_key": "k"}
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import orjson
from aiohttp import web

from tests.serving import in_thread, serve

_SIGNING_KEY = b"fake-anthropic-signing-key"
TOOL_MARKER = re.compile(r"CALL_TOOL:([A-Za-z0-9_.-]+)")


def sign(thinking: str) -> str:
    """The signature the fake gives a thinking text (the real API's is opaque; this one checks)."""
    return base64.b64encode(hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).digest() * 3).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        return orjson.loads(self.raw)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content or () if isinstance(b, dict) and b.get("type") == "text")


class FakeAnthropic:
    def __init__(self, api_key: str = "anthropic-upstream-key") -> None:
        self.api_key = api_key
        self.requests: list[Received] = []
        self.sent: list[dict[str, Any]] = []  # every message answered (the JSON body, or what the stream added up to)
        self.base_url = ""
        self._ids = itertools.count(1)
        self._tools: deque[tuple[str, dict[str, Any]]] = deque()  # scripted tool calls, see call_tool
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_post("/v1/messages", self._messages)
        self.app.router.add_post("/v1/messages/count_tokens", self._count_tokens)

    def call_tool(self, name: str, tool_input: dict[str, Any]) -> None:
        """Answer the next request that offers tool ``name`` (and is not a tool result) by calling it."""
        self._tools.append((name, tool_input))

    @property
    def messages_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path == "/v1/messages"]

    # -- handlers ----------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), raw))
        refused = self._refusal(request, raw)
        if refused is not None:
            return refused
        if "OVERLOADED" in raw.decode("utf-8", "replace"):
            return _error(529, "overloaded_error", "Overloaded")
        body = orjson.loads(raw)
        message = self._answer(body)
        self.sent.append(message)
        if not body.get("stream"):
            return web.json_response(message)
        return await self._stream(request, message, fail=_last_user_text(body).find("FAIL_MIDSTREAM") >= 0)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), raw))
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        body = orjson.loads(raw)
        return web.json_response({"input_tokens": max(1, len(orjson.dumps(body.get("messages"))) // 4)})

    def _authorised(self, request: web.Request) -> bool:
        # x-api-key, or a bearer as recent SDKs send their api_key
        return self.api_key in (request.headers.get("x-api-key"), request.headers.get("Authorization", "").removeprefix("Bearer "))

    def _refusal(self, request: web.Request, raw: bytes) -> web.Response | None:
        if not self._authorised(request):
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "body is not JSON")
        if not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            return _error(400, "invalid_request_error", "max_tokens and messages are required")
        asked: set[str] = set()
        for index, message in enumerate(body["messages"]):
            content = message.get("content")
            blocks = content if isinstance(content, list) else []
            answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
            if asked - answered:
                return _error(400, "invalid_request_error", f"messages.{index}: tool_use ids were found without tool_result blocks immediately after: {sorted(asked - answered)}")
            if answered - asked:
                return _error(400, "invalid_request_error", f"messages.{index}: unexpected tool_use_id found in tool_result blocks")
            asked = {b["id"] for b in blocks if b.get("type") == "tool_use"} if message.get("role") == "assistant" else set()
            for block in blocks:
                if block.get("type") == "thinking" and block.get("signature") != sign(block.get("thinking", "")):
                    return _error(400, "invalid_request_error", f"messages.{index}: Invalid `signature` in `thinking` block")
        if asked:
            return _error(400, "invalid_request_error", "the last assistant turn has tool_use ids without tool_result blocks")
        return None

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        number = next(self._ids)
        last = body["messages"][-1]
        content: list[dict[str, Any]] = []
        if body.get("thinking") and body["thinking"].get("type") != "disabled":
            thought = f"Thinking about request {number}: the user wants an answer."
            content.append({"type": "thinking", "thinking": thought, "signature": sign(thought)})
        results = [b for b in last.get("content") or () if isinstance(b, dict) and b.get("type") == "tool_result"] if isinstance(last.get("content"), list) else []
        marker = TOOL_MARKER.search(_last_user_text(body))
        offered = {t.get("name") for t in body.get("tools") or ()}
        scripted = self._tools.popleft() if self._tools and not results and self._tools[0][0] in offered else None
        stop = "end_turn"
        if scripted is not None:
            content.append({"type": "tool_use", "id": f"toolu_fake{number:04d}", "name": scripted[0], "input": scripted[1]})
            stop = "tool_use"
        elif results:
            content.append({"type": "text", "text": "tool said: " + " | ".join(_text(b.get("content")) for b in results)})
        elif marker and body.get("tools"):
            content.append({"type": "text", "text": "Let me check."})
            content.append({"type": "tool_use", "id": f"toolu_fake{number:04d}", "name": marker.group(1), "input": {"query": "weather", "n": number}})
            stop = "tool_use"
        else:
            content.append({"type": "text", "text": f"Fake Claude reply {number} to: {_last_user_text(body)[:200]}"})
        input_tokens = max(1, len(orjson.dumps(body["messages"])) // 4)
        return {"id": f"msg_fake{number:04d}", "type": "message", "role": "assistant", "model": body.get("model"), "content": content,
                "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 7 * len(content), "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}

    async def _stream(self, request: web.Request, message: dict[str, Any], fail: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        start = dict(message, content=[], stop_reason=None, usage=dict(message["usage"], output_tokens=1))
        events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
        for index, block in enumerate(message["content"]):
            if block["type"] == "thinking":
                events.append({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
                half = len(block["thinking"]) // 2
                for piece in (block["thinking"][:half], block["thinking"][half:]):
                    events.append({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": piece}})
                events.append({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": block["signature"]}})
            elif block["type"] == "tool_use":
                events.append({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                arguments = orjson.dumps(block["input"]).decode()
                for at in range(0, len(arguments), 10):
                    events.append({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments[at:at + 10]}})
            else:
                events.append({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
                for word in re.findall(r"\S+\s*", block["text"]):
                    events.append({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": word}})
                    if fail:
                        events.append({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                        break
            events.append({"type": "content_block_stop", "index": index})
            if index == 0:
                events.append({"type": "fake_annotation", "note": "an event type no client knows"})
        events.append({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                       "usage": {"output_tokens": message["usage"]["output_tokens"]}})
        events.append({"type": "message_stop"})
        for event in events:
            await response.write(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
            if event["type"] == "error":
                break
        await response.write_eof()
        return response

    # -- running -----------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, **kwargs: Any) -> AsyncIterator[FakeAnthropic]:
        """Serve on the running loop, on a free port."""
        fake = cls(**kwargs)
        async with serve(fake.app) as port:
            fake.base_url = f"http://127.0.0.1:{port}/v1"
            yield fake

    @classmethod
    @contextlib.contextmanager
    def run_in_thread(cls, **kwargs: Any) -> Iterator[FakeAnthropic]:
        with in_thread(lambda: cls.start(**kwargs), "fake-anthropic") as fake:
            yield fake


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            text = _text(message.get("content"))
            if text:
                return text
    return ""


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)
