"""Property-based fuzz (issue #20 "Proof", issue #30): random, mostly-valid bodies against ONE
long-lived proxy. Every answer is < 500 with no connection error, and every 50 bodies a canary
session takes a routine turn and a critical one ("I prefer tea"): both acknowledged and present
in the admin view — a bad body must never poison what later requests of other sessions store.

Profiles (tests/security/conftest.py): "security-fast" in CI, ``HYPOTHESIS_PROFILE=deep`` for a
long hunt.
"""

from __future__ import annotations

import re
import string
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, strategies as st

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant
from tests.memory_helpers import drain
from tests.security.conftest import fuzz_settings, running_proxy

PROBE_EVERY = 50
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]

# -- strategies -------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Deeply nested values are written as placeholders and expanded in the raw bytes: orjson (and
# therefore hypothesis's own encoding here) cannot write more than 254 levels.
deep = st.integers(40, 1100).map(lambda depth: f"@@nested:{depth}@@")
anything = json_values | deep
text = st.text(max_size=40) | st.sampled_from(["hi", "I prefer tea", "we decided to ship", "", "\u0000", "\ud7ff"])


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the valid strategy, sometimes any JSON value at all."""
    return st.one_of(strategy, strategy, strategy, anything)


parts = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "image_url", "input_audio", "file", "refusal", "x"]))},
                              optional={"text": maybe(text), "image_url": maybe(st.fixed_dictionaries({"url": text})),
                                        "cache_control": anything})
tool_calls = st.lists(maybe(st.fixed_dictionaries({"id": maybe(text), "type": maybe(st.just("function")),
                                                   "function": maybe(st.fixed_dictionaries({"name": maybe(text), "arguments": maybe(text)}))})),
                      max_size=3)
messages = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(ROLES)), "content": maybe(text | st.lists(maybe(parts), max_size=3))},
    optional={"name": maybe(text), "tool_calls": maybe(tool_calls), "tool_call_id": maybe(text), "x": anything},
)
tools = st.lists(maybe(st.fixed_dictionaries({"type": maybe(st.just("function")), "function": maybe(st.fixed_dictionaries(
    {"name": maybe(text)}, optional={"parameters": anything, "description": maybe(text)}))})), max_size=2)
mutated_chat = st.fixed_dictionaries(
    {"model": maybe(st.just("fake-model")), "messages": maybe(st.lists(maybe(messages), min_size=1, max_size=5))},
    optional={
        "stream": maybe(st.booleans()), "n": maybe(st.integers(0, 3)), "temperature": maybe(st.floats(0, 2)),
        "tools": maybe(tools), "tool_choice": anything, "metadata": maybe(st.dictionaries(st.sampled_from(["session_id", "user_id", "k"]), text, max_size=2)),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})), "stop": anything,
        "response_format": anything, "max_tokens": maybe(st.integers(-1, 100)), "user": maybe(text),
        "fallbacks": anything, "mock_response": anything, "api_base": anything, "top_k": anything,
    },
)

# Valid conversations (so most bodies get through to reconciliation, context, memory and the
# store): shapes a real agent sends, over a few shared session ids, with odd but legal content.
shallow = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
call = st.builds(lambda i, name, args: {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}},
                 st.integers(0, 3), st.sampled_from(["f", "read_file", "x" * 50]), text)
turn = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text},
                                                                                                      optional={"cache_control": shallow}), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": text}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(call, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": text, "tool_call_id": st.sampled_from(["call_0", "call_1"])}),
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]), "content": text}),
)
valid_chat = st.fixed_dictionaries(
    {"model": st.just("fake-model"),
     "messages": st.lists(turn, max_size=6).map(lambda ms: ms + [{"role": "user", "content": "and now?"}])},
    optional={"stream": st.booleans(), "temperature": st.floats(0, 2), "max_tokens": st.integers(1, 100),
              "stream_options": st.just({"include_usage": True}), "metadata": st.fixed_dictionaries({}, optional={"user_id": st.sampled_from(["u1", "u2"])}),
              "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])},
)
chat_bodies = st.one_of(valid_chat, valid_chat, mutated_chat)
memory_bodies = st.fixed_dictionaries(
    {"content": maybe(text)},
    optional={"type": maybe(st.sampled_from(["semantic", "procedural", "episodic"])), "user_id": maybe(text),
              "session_id": maybe(text), "metadata": anything, "extra": anything},
)
search_bodies = st.fixed_dictionaries(
    {"query": maybe(text)},
    optional={"user_id": maybe(text), "session_id": maybe(text), "scope": maybe(st.sampled_from(["user", "session", "tenant"])),
              "top_k": maybe(st.integers(0, 200)), "types": anything, "min_score": anything},
)
# Header values as a client can send them (HTTP forbids control characters and surrounding
# blanks): any other byte, non-UTF-8 included.
header_bytes = st.binary(min_size=1, max_size=30).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip(b" ")).filter(bool)
sessions = st.sampled_from([b"fuzz-a", b"fuzz-b", b"fuzz-c"])
headers = st.one_of(
    st.fixed_dictionaries({}, optional={"X-Session-ID": sessions, "Idempotency-Key": st.sampled_from([b"k1", b"k2"])}),
    st.fixed_dictionaries({}, optional={"X-Session-ID": header_bytes | sessions, "X-User-ID": header_bytes, "Idempotency-Key": header_bytes}),
)
path_ids = st.text(string.ascii_letters + string.digits + "_-.%", min_size=1, max_size=30)


@st.composite
def requests(draw) -> tuple[str, str, bytes | None, dict[str, bytes]]:
    kind = draw(st.sampled_from(["chat", "chat", "chat", "chat", "raw", "memory", "search", "list", "get", "delete"]))
    if kind == "chat":
        return "POST", "/v1/chat/completions", encode(draw(chat_bodies)), draw(headers)
    if kind == "raw":
        return "POST", draw(st.sampled_from(["/v1/chat/completions", "/v1/memories", "/v1/memories/search", "/v1/embeddings"])), draw(st.binary(max_size=200)), {}
    if kind == "memory":
        return "POST", "/v1/memories", encode(draw(memory_bodies)), draw(headers)
    if kind == "search":
        return "POST", "/v1/memories/search", encode(draw(search_bodies)), draw(headers)
    if kind == "list":
        query = draw(st.dictionaries(st.sampled_from(["type", "user_id", "session_id", "limit", "after"]), st.text(max_size=10), max_size=3))
        return "GET", "/v1/memories?" + httpx.QueryParams(query).__str__(), None, {}
    return ("GET" if kind == "get" else "DELETE"), "/v1/memories/" + draw(path_ids), None, {}


def encode(body: Any) -> bytes:
    raw = orjson.dumps(body)
    return re.sub(rb'"@@nested:(\d+)@@"', lambda m: b"[" * int(m[1]) + b"1" + b"]" * int(m[1]), raw)


# -- the test -----------------------------------------------------------------------------------

class Canary:
    """One session that keeps taking valid turns while the fuzz runs."""

    def __init__(self, proxy: ProxyThread, client: httpx.Client) -> None:
        self.proxy, self.client, self.session, self.probes = proxy, client, "canary-" + uuid.uuid4().hex[:8], 0

    def probe(self) -> None:
        self.probes += 1
        said = [f"routine turn number {self.probes}", f"I prefer tea, probe {self.probes}"]
        for content in said:
            response = self.client.post(self.proxy.base_url + "/chat/completions", headers={"X-Session-ID": self.session},
                                        json={"model": "fake-model", "messages": [{"role": "user", "content": content}]})
            assert response.status_code == 200, f"canary turn {content!r} refused: {response.text[:300]}"
        view = self.client.get(f"{self.proxy.url}/admin/sessions/{self.session}")
        assert view.status_code == 200, view.text[:300]
        stored = {m["body"]["content"]: m for m in view.json()["messages"] if m["role"] == "user"}
        for content in said:
            assert content in stored, f"acknowledged canary turn {content!r} missing from the store"
        assert "preference" in (stored[said[1]]["tags"] or []), stored[said[1]]


def test_fuzz_never_500_and_never_poisons_other_sessions(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_proxy(tmp_path, open_tenant(upstream.base_url)) as proxy, httpx.Client(timeout=60) as client:
        drain(proxy)  # long-term memory is up, so /v1/memories is fuzzed rather than 503
        canary, sent = Canary(proxy, client), [0]
        canary.probe()

        @fuzz_settings()
        @given(request=requests())
        def fuzz(request: tuple[str, str, bytes | None, dict[str, bytes]]) -> None:
            method, path, body, extra = request
            try:
                response = client.request(method, proxy.url + path, content=body,
                                          headers={"Content-Type": "application/json"} | extra)
            except httpx.TransportError as exc:
                pytest.fail(f"connection error on {method} {path}: {exc!r}")
            assert response.status_code < 500, f"{method} {path} {body[:300] if body else b''!r} -> {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                error = response.json()["error"]  # OpenAI's shape, always
                assert error["message"] and error["type"]
            elif response.headers.get("content-type", "").startswith("text/event-stream"):
                # A stream that started fine must not end in the proxy's own failure either.
                assert b'"internal_error"' not in response.content and b'"storage_error"' not in response.content, response.text[-500:]
            sent[0] += 1
            if sent[0] % PROBE_EVERY == 0:
                canary.probe()

        fuzz()
        canary.probe()
        print(f"fuzz: {sent[0]} requests, {canary.probes} canary probes")
