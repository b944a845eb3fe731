"""Fake OpenAI-compatible LLM provider: a real local aiohttp server for tests and benchmarks.

The proxy talks to it over real HTTP, so its whole upstream code path (client
session, SSE parsing, retries, error mapping, auth forwarding) is exercised.

Usage is deterministic: prompt_tokens = characters of message text ÷ 4, and
prompt_tokens_details.cached_tokens = the prefix a request shares with the previous request
of its prompt cache (``cached_prompt_tokens``), so prompt-cache accounting has a known truth.

Async tests::

    async with FakeUpstream.start() as fake:
        client = AsyncOpenAI(base_url=fake.base_url, api_key="x")

Sync tests::

    with FakeUpstream.run_in_thread() as fake:
        ...

Standalone (benchmarks, manual tries)::

    python -m tests.fake_upstream --port 9999 --latency 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import re
import signal
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
from aiohttp import web

from tests import fake_responses
from tests.serving import in_thread, serve

DEFAULT_MODEL = "fake-model"
SYSTEM_FINGERPRINT = "fp_fake_upstream"
TOOL_MARKER = re.compile(r"CALL_TOOL:([A-Za-z0-9_.-]+)")

# Default OpenAI error "type" per status, so SDKs and the proxy see familiar bodies.
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    429: ("requests", "rate_limit_exceeded"),
}

Responder = Callable[[dict], "str | dict | None"]


@dataclass
class _Failure:
    status: int
    message: str
    error_type: str
    code: str | None
    headers: dict[str, str]
    body: str | None


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def content_text(content: Any) -> str:
    """Plain text of a message content: a string, a list of content parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def approx_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: ~4 characters per token, at least 1."""
    return max(1, len(text) // 4)


def _message_text(message: dict) -> str:
    """The characters of one message that prompt_tokens counts: its text and tool-call arguments."""
    text = content_text(message.get("content"))
    for call in message.get("tool_calls") or []:
        text += str((call.get("function") or {}).get("arguments", ""))
    return text


def _prompt_tokens(body: dict) -> int:
    chars = sum(len(_message_text(m)) for m in body.get("messages") or [] if isinstance(m, dict))
    return max(1, chars // 4)


def cache_key(body: dict, headers: dict[str, str]) -> str:
    """Which prompt cache a request reads: its ``prompt_cache_key``, else its X-Session-ID
    header, else its ``user`` field, else the one shared cache."""
    return str(body.get("prompt_cache_key") or headers.get("x-session-id") or body.get("user") or "")


def cached_prompt_tokens(previous: dict | None, body: dict) -> int:
    """Tokens of ``body``'s prompt a provider would read from its cache after ``previous``.

    The truth the proxy's accounting is tested against: the longest common prefix of the two
    rendered prompts, in the characters ``prompt_tokens`` counts (message text and tool-call
    arguments, message after message; a message matches whole when its role, text and every
    other field are equal, else only its text's common prefix counts and the prefix ends
    there), divided by 4 like prompt_tokens. Different tool definitions share nothing (they
    come first in a provider's rendering). No minimum length and no 128-token granularity."""
    if previous is None or previous.get("tools") != body.get("tools"):
        return 0
    chars = 0
    old, new = previous.get("messages") or [], body.get("messages") or []
    for before, now in zip(old, new):
        if not isinstance(before, dict) or not isinstance(now, dict):
            break
        if before == now:
            chars += len(_message_text(now))
            continue
        if before.get("role") == now.get("role"):
            a, b = _message_text(before), _message_text(now)
            common = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                common += 1
            chars += common
        break
    return min(_prompt_tokens(body), chars // 4)


def _embedding(text: str, dim: int) -> list[float]:
    """Unit vector seeded by sha256 of the text: same text, same vector, across runs."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(v / 0xFFFFFFFF) * 2 - 1 for v in struct.unpack(f"<{dim}I", raw[: dim * 4])]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _split_text(text: str) -> list[str]:
    """Word-sized pieces (whitespace kept) so streams have several content deltas."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _split_args(arguments: str, size: int = 8) -> list[str]:
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


class FakeUpstream:
    """State and aiohttp app of one fake provider. Switch attributes apply to the next requests."""

    def __init__(
        self,
        *,
        expected_api_key: str | None = None,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        embedding_dim: int = 8,
        models: list[str] | None = None,
    ) -> None:
        self.expected_api_key = expected_api_key
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.embedding_dim = embedding_dim
        self.models = list(models or [DEFAULT_MODEL, "fake-embedding"])
        self.responder: Responder | None = None
        self.requests: list[dict] = []
        # The previous chat request of each prompt cache (cache_key): usage reports the tokens
        # of the prompt it shares with the next one as cached (cached_prompt_tokens).
        self.last_prompts: dict[str, dict] = {}
        self.base_url = ""  # set once bound: "http://127.0.0.1:PORT/v1"
        self.port = 0
        # Switches can be set from the test thread while the loop thread serves,
        # so the queues are guarded by a plain lock (never held across an await).
        self._lock = threading.Lock()
        self._replies: deque[str | dict] = deque()
        self._failures: deque[_Failure] = deque()
        self._mid_stream_failures: deque[int] = deque()
        self._hangs = 0
        self._ids = itertools.count(1)
        self._closing: asyncio.Event | None = None
        self._prefixes: set[bytes] = set()  # message prefixes seen, for OpenAI-style prompt caching
        self.app = self._make_app()

    # ----------------------------------------------------------------- switches

    def script_reply(self, *replies: str | dict) -> None:
        """Queue replies for the next chat calls, one per call.

        A str is the assistant content; a dict is the assistant message (may hold
        `tool_calls`, shorthand `{"name", "arguments"}` items allowed, and an
        optional `finish_reason` override).
        """
        with self._lock:
            self._replies.extend(replies)

    def script_tool_call(self, name: str, arguments: dict | str | None = None, *, content: str | None = None) -> None:
        """Queue one reply that calls tool `name` with `arguments`."""
        self.script_reply({"content": content, "tool_calls": [{"name": name, "arguments": arguments or {}}]})

    def fail_next(
        self,
        status: int = 500,
        message: str | None = None,
        *,
        count: int = 1,
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | str | None = None,
        headers: dict[str, str] | None = None,
        body: str | None = None,
    ) -> None:
        """Make the next `count` chat/embeddings calls fail with an OpenAI-shaped error.

        429s carry `retry-after` (default "0" to keep tests fast). `body` replaces the
        JSON error body with raw text, to test non-JSON upstream errors.
        """
        default_type, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        extra = dict(headers or {})
        if retry_after is None and status == 429:
            retry_after = 0
        if retry_after is not None:
            extra.setdefault("retry-after", str(retry_after))
        failure = _Failure(
            status=status,
            message=message or f"fake upstream error {status}",
            error_type=error_type or default_type,
            code=code if code is not None else default_code,
            headers=extra,
            body=body,
        )
        with self._lock:
            self._failures.extend([failure] * count)

    def fail_mid_stream(self, after_chunks: int = 2, *, count: int = 1) -> None:
        """Cut the next `count` streaming responses after `after_chunks` SSE events, without [DONE]."""
        with self._lock:
            self._mid_stream_failures.extend([after_chunks] * count)

    def hang_next(self, count: int = 1) -> None:
        """Never answer the next `count` chat/embeddings calls (released at shutdown)."""
        with self._lock:
            self._hangs += count

    def reset(self) -> None:
        """Forget recorded requests and pending switches; keep config (key, latency, dims)."""
        with self._lock:
            self.requests.clear()
            self.last_prompts.clear()
            self._replies.clear()
            self._failures.clear()
            self._mid_stream_failures.clear()
            self._hangs = 0
        self.responder = None

    # ------------------------------------------------------------ inspection

    @property
    def chat_requests(self) -> list[dict]:
        """JSON bodies of every chat completion call received, in order."""
        return [r["json"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    @property
    def embedding_requests(self) -> list[dict]:
        return [r["json"] for r in self.requests if r["path"] == "/v1/embeddings"]

    @property
    def last_request(self) -> dict | None:
        return self.requests[-1] if self.requests else None

    @property
    def auth_headers(self) -> list[str | None]:
        """Authorization header of every request, to check which key the proxy forwarded."""
        return [r["headers"].get("authorization") for r in self.requests]

    # ------------------------------------------------------------------ app

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)  # an OpenAI upstream that speaks Responses too
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        return app

    def _pop(self, queue_name: str) -> Any:
        with self._lock:
            queue = getattr(self, queue_name)
            return queue.popleft() if queue else None

    def _take_hang(self) -> bool:
        with self._lock:
            if self._hangs > 0:
                self._hangs -= 1
                return True
            return False

    async def _preamble(self, request: web.Request, *, model_call: bool) -> tuple[dict | None, web.StreamResponse | None]:
        """Record the request and apply latency/auth/hang/failure switches.

        Returns (json body, None) to proceed, or (body, response) to answer right away.
        """
        body: dict | None = None
        bad_json = False
        if request.can_read_body:
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                bad_json = True
        # Lower-cased keys: HTTP header names are case-insensitive, tests shouldn't care.
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append({"method": request.method, "path": request.path, "headers": headers, "json": body})

        if self.latency:
            await asyncio.sleep(self.latency)
        if self.expected_api_key is not None and headers.get("authorization") != f"Bearer {self.expected_api_key}":
            return body, self._json_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if bad_json or (model_call and not isinstance(body, dict)):
            return body, self._json_error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        if model_call:
            if self._take_hang():
                await self._wait_for_shutdown(request)
                return body, web.Response(status=503)
            failure = self._pop("_failures")
            if failure is not None:
                if failure.body is not None:
                    return body, web.Response(status=failure.status, text=failure.body, headers=failure.headers)
                return body, self._json_error(
                    failure.status, failure.message, failure.error_type, failure.code, headers=failure.headers
                )
        return body, None

    async def _wait_for_shutdown(self, request: web.Request) -> None:
        assert self._closing is not None
        await self._closing.wait()
        # The client gave up long ago; drop the socket rather than answer.
        if request.transport is not None:
            request.transport.close()

    @staticmethod
    def _json_error(status: int, message: str, error_type: str, code: str | None, headers: dict | None = None) -> web.Response:
        return web.Response(
            status=status,
            body=_dumps(_error_body(message, error_type, code)),
            content_type="application/json",
            headers=headers,
        )

    # ---------------------------------------------------------------- chat

    def _messages_for(self, body: dict) -> list[dict]:
        """The assistant message of each of the `n` choices (plus optional finish_reason)."""
        n = max(1, int(body.get("n") or 1))
        reply = self._pop("_replies")
        if reply is None and self.responder is not None:
            reply = self.responder(body)
        if reply is None:
            reply = self._default_reply(body)
        base = self._normalise(reply)
        messages = [base]
        for i in range(1, n):
            extra = dict(base)
            # Distinct but predictable text per choice, so tests can tell choices apart.
            if isinstance(extra.get("content"), str):
                extra["content"] = f"{extra['content']} [{i}]"
            messages.append(extra)
        return messages

    @staticmethod
    def _default_reply(body: dict) -> str | dict:
        text = last_user_text(body)
        match = TOOL_MARKER.search(text)
        if body.get("tools") and match:
            # Optional JSON arguments right after the marker: CALL_TOOL:name {"a": 1}
            rest = text[match.end() :].lstrip()
            arguments: Any = {}
            if rest.startswith("{"):
                with contextlib.suppress(ValueError):
                    arguments, _ = json.JSONDecoder().raw_decode(rest)
            return {"content": None, "tool_calls": [{"name": match.group(1), "arguments": arguments}]}
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in ("json_object", "json_schema"):
            return json.dumps({"echo": text})
        return f"echo: {text}"

    def _normalise(self, reply: str | dict) -> dict:
        if isinstance(reply, str):
            return {"role": "assistant", "content": reply, "finish_reason": "stop"}
        message = {"role": "assistant", "content": reply.get("content")}
        calls = []
        for i, call in enumerate(reply.get("tool_calls") or []):
            # Accept the full OpenAI shape or the {"name", "arguments"} shorthand.
            fn = dict(call["function"]) if "function" in call else {"name": call["name"], "arguments": call.get("arguments")}
            call_id = call.get("id") or f"call_fake_{next(self._ids)}_{i}"
            if not isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.dumps(fn.get("arguments") or {})
            calls.append({"id": call_id, "type": "function", "function": fn})
        if calls:
            message["tool_calls"] = calls
        message["finish_reason"] = reply.get("finish_reason") or ("tool_calls" if calls else "stop")
        return message

    @staticmethod
    def _completion_tokens(messages: list[dict]) -> int:
        total = 0
        for m in messages:
            text = m.get("content") or ""
            text += "".join(c["function"]["arguments"] for c in m.get("tool_calls") or [])
            total += approx_tokens(text)
        return total

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._preamble(request, model_call=True)
        if early is not None:
            return early
        assert isinstance(body, dict)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._json_error(400, "'messages' is a required property", "invalid_request_error", None)
        messages = self._messages_for(body)
        prompt = _prompt_tokens(body)
        completion = self._completion_tokens(messages)
        key = cache_key(body, {k.lower(): v for k, v in request.headers.items()})
        with self._lock:
            cached = cached_prompt_tokens(self.last_prompts.get(key), body)
            self.last_prompts[key] = body
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0}}
        head = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or DEFAULT_MODEL,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, head, messages, usage if include_usage else None)

        choices = []
        for i, m in enumerate(messages):
            message = {k: v for k, v in m.items() if k != "finish_reason"}
            message.setdefault("refusal", None)
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": m["finish_reason"]})
        payload = {**head, "choices": choices, "usage": usage}
        return web.Response(body=_dumps(payload), content_type="application/json")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await fake_responses.respond(self, request)

    def _cached_tokens(self, messages: list) -> int:
        """Like OpenAI's prompt caching: the tokens of the longest message prefix an earlier
        request already sent count as cached."""
        keys, chain = [], b""
        for message in messages:  # a hash chain: linear in the conversation's length
            chain = hashlib.sha256(chain + _dumps(message)).digest()
            keys.append(chain)
        with self._lock:
            seen = max((i + 1 for i, key in enumerate(keys) if key in self._prefixes), default=0)
            self._prefixes.update(keys)
        return _prompt_tokens({"messages": messages[:seen]}) if seen else 0

    @staticmethod
    def _chunk_events(head: dict, messages: list[dict], usage: dict | None) -> Iterator[dict]:
        """chat.completion.chunk objects in the order OpenAI sends them."""

        def chunk(choices: list[dict]) -> dict:
            data = {**head, "object": "chat.completion.chunk", "choices": choices}
            if usage is not None:
                data["usage"] = None  # OpenAI sends usage: null on every chunk but the last
            return data

        def choice(index: int, delta: dict, finish: str | None = None) -> dict:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        for i, m in enumerate(messages):
            calls = m.get("tool_calls") or []
            content = m.get("content")
            if calls:
                yield chunk([choice(i, {"role": "assistant", "content": content, "refusal": None})])
                for ci, call in enumerate(calls):
                    # First delta names the call; arguments follow in pieces.
                    yield chunk([choice(i, {"tool_calls": [{
                        "index": ci, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""},
                    }]})])
                    for piece in _split_args(call["function"]["arguments"]):
                        yield chunk([choice(i, {"tool_calls": [{"index": ci, "function": {"arguments": piece}}]})])
            else:
                yield chunk([choice(i, {"role": "assistant", "content": "", "refusal": None})])
                for piece in _split_text(content or ""):
                    yield chunk([choice(i, {"content": piece})])
            yield chunk([choice(i, {}, m["finish_reason"])])
        if usage is not None:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}

    async def _stream(self, request: web.Request, head: dict, messages: list[dict], usage: dict | None) -> web.StreamResponse:
        cut_after = self._pop("_mid_stream_failures")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for sent, event in enumerate(self._chunk_events(head, messages, usage)):
            if cut_after is not None and sent >= cut_after:
                # Drop the socket mid-body: the chunked body never terminates, no [DONE].
                if request.transport is not None:
                    request.transport.close()
                return response
            if sent and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await response.write(b"data: " + _dumps(event) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------- embeddings/models

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, early = await self._preamble(request, model_call=True)
        if early is not None:
            return early
        assert isinstance(body, dict)
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs = [raw]  # one string, or one token array
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            return self._json_error(400, "'input' is a required property", "invalid_request_error", None)
        dim = int(body.get("dimensions") or self.embedding_dim)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += len(item) if isinstance(item, list) else approx_tokens(item)
            vector = _embedding(text, dim)
            # The openai SDK asks for base64 (little-endian float32) unless told otherwise.
            encoded: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model") or "fake-embedding",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=_dumps(payload), content_type="application/json")

    def _model_obj(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}

    async def _models(self, request: web.Request) -> web.Response:
        _, early = await self._preamble(request, model_call=False)
        if early is not None:
            return early
        payload = {"object": "list", "data": [self._model_obj(m) for m in self.models]}
        return web.Response(body=_dumps(payload), content_type="application/json")

    async def _model(self, request: web.Request) -> web.Response:
        _, early = await self._preamble(request, model_call=False)
        if early is not None:
            return early
        model_id = request.match_info["model"]
        if model_id not in self.models:
            return self._json_error(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model_not_found")
        return web.Response(body=_dumps(self._model_obj(model_id)), content_type="application/json")

    # -------------------------------------------------------------- running

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, port: int = 0, host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator["FakeUpstream"]:
        """Serve on the running loop; `port=0` picks a free ephemeral port."""
        fake = cls(**kwargs)
        fake._closing = asyncio.Event()
        # Hung handlers are released first, so the short shutdown grace is enough.
        async with serve(fake.app, host, port, shutdown_timeout=2.0, before_cleanup=fake._closing.set) as fake.port:
            fake.base_url = f"http://{host}:{fake.port}/v1"
            yield fake

    @classmethod
    @contextlib.contextmanager
    def run_in_thread(cls, port: int = 0, host: str = "127.0.0.1", **kwargs: Any) -> Iterator["FakeUpstream"]:
        """Serve from a daemon thread with its own loop, for sync tests and SDK clients."""
        with in_thread(lambda: cls.start(port, host, **kwargs), "fake-upstream") as fake:
            yield fake


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each response")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE chunks")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument("--embedding-dim", type=int, default=8)
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with FakeUpstream.start(
            port=args.port,
            host=args.host,
            latency=args.latency,
            chunk_delay=args.chunk_delay,
            expected_api_key=args.api_key,
            embedding_dim=args.embedding_dim,
        ) as fake:
            print(f"fake upstream listening on {fake.base_url}", flush=True)
            stop = asyncio.Event()
            # Benchmarks stop it with SIGTERM; shut down cleanly rather than die mid-write.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
