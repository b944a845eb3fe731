"""Provider prompt caching: append-mostly prompts, cache hints, cached-token accounting (proxy/context/caching.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from aiohttp import web

from proxy.context import caching
from proxy.memory.inject import HEADER
from tests.fake_upstream import FakeUpstream, _prompt_tokens, cache_key, cached_prompt_tokens
from tests.harness import open_tenant, route, write_config
from tests.serving import in_thread, serve
from tests.memory_helpers import SLOW_OK, drain, recalled_block, running

SYSTEM = {"role": "system", "content": "You are a careful engineering assistant for the billing team."}
DECISION = "Decision: we will use PostgreSQL 16 for the billing ledger, and that is final."
_TOPICS = ["invoices", "refunds", "currency rates", "ledger exports", "retry queues", "tenant regions", "backups", "alerts"]


def turn_text(t: int) -> str:
    if t == 2:
        return DECISION
    topic = _TOPICS[t % len(_TOPICS)]
    return f"Turn {t}: what about the {topic} of account {1000 + t}, scheduled for day {t % 28 + 1} with {t * 3} retries?"


def cached_truth(fake: FakeUpstream, key: str) -> tuple[int, int]:
    """(prompt tokens, cached tokens) the fake upstream billed the requests of one prompt cache."""
    previous, prompt, cached = None, 0, 0
    for request in fake.requests:
        if request["path"] != "/v1/chat/completions":
            continue
        body = request["json"]
        if cache_key(body, request["headers"]) != key:
            continue
        prompt += _prompt_tokens(body)
        cached += cached_prompt_tokens(previous, body)
        previous = body
    return prompt, cached


def stable_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A forwarded prompt without what changes every turn: the newest user message and the
    proxy's blocks right before it (retrieved turns, recalled memories)."""
    end = max(i for i, m in enumerate(messages) if m["role"] == "user" and not caching._is_tail(m))
    while end > 0 and caching._is_tail(messages[end - 1]):
        end -= 1
    return messages[:end]


def test_consecutive_requests_append_to_the_same_prefix_and_accounting_matches_the_provider(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A 70-turn conversation through a small budget, long-term memory on: each request repeats
    the previous one up to its newest turn (except right after a compaction, which is rare),
    recalled memories never enter the system prompt, and the session's cached tokens are what
    the provider reported."""
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK}, context={
        "max_context_tokens": 2400, "reserve_completion_tokens": 200, "window_turns": 4, "segment_turns": 4,
        "summary_tokens": 64, "prompt_cache_key": True,
        "tail_share_of_saved": 0.5,  # room for memories and retrieved turns early on: the blocks must show up
    })
    client_history: list[dict[str, Any]] = [SYSTEM]
    responses = []
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="local", max_retries=0)
        for t in range(70):
            client_history.append({"role": "user", "content": turn_text(t)})
            stream = t % 5 == 4  # some answers streamed: their usage chunk is accounted too
            raw = sdk.chat.completions.with_raw_response.create(
                model="fake-model", messages=client_history, extra_headers={"X-Session-ID": "long", "X-User-ID": "ana"},
                stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            else:
                text = raw.parse().choices[0].message.content
            responses.append(raw)
            client_history.append({"role": "assistant", "content": text})
            drain(proxy)  # the background work a model's answer time would leave room for
        view = httpx.get(f"{proxy.url}/admin/sessions/long", headers={"Authorization": "Bearer local"}).json()
        listing = httpx.get(f"{proxy.url}/admin/sessions", headers={"Authorization": "Bearer local"}).json()

    forwarded = upstream.chat_requests
    assert len(forwarded) == 70
    compacted = [r.headers.get("x-context-compacted") == "true" for r in responses]
    first = compacted.index(True)  # the history outgrew the budget
    assert 5 < first < 40
    # Compaction in rare, large steps: after the first, a handful of them over the remaining turns.
    assert sum(compacted) <= 1 + (70 - first) // 6
    for i in range(1, 70):
        previous, current = forwarded[i - 1]["messages"], forwarded[i]["messages"]
        assert current[0] == SYSTEM  # verbatim: no memory block in it
        assert not any(HEADER in str(m.get("content")) for m in current if m["role"] == "system")
        recalled_block(forwarded[i])  # where the memory block is, when there is one
        if not compacted[i]:
            stable = stable_part(previous)
            assert current[:len(stable)] == stable, f"request {i} rewrote the prefix of request {i - 1}"
    assert any(recalled_block(b) for b in forwarded), "memory never recalled anything: the test proves nothing"
    assert {"role": "user", "content": DECISION} in forwarded[-1]["messages"]  # the pinned decision survives, verbatim

    # Accounting: the provider's truth, request by request and in total.
    key = forwarded[-1]["prompt_cache_key"]
    assert key.startswith("asp-") and "long" not in key and {b["prompt_cache_key"] for b in forwarded} == {key}
    prompt, cached = cached_truth(upstream, key)
    totals = view["session"]["extra"]["cache"]
    assert totals["requests"] == 70
    assert (totals["prompt_tokens"], totals["cached_tokens"]) == (prompt, cached)
    assert cached > prompt * 0.6  # most of what was sent was a cached prefix
    for raw in responses[:-1]:
        if "x-context-cached-tokens" in raw.headers:  # non-streamed answers carry it
            assert int(raw.headers["x-context-cached-tokens"]) == raw.parse().usage.prompt_tokens_details.cached_tokens
    assert listing["cache"]["cached_tokens"] == cached and listing["cache"]["tokens_saved_by_compaction"] > 0


# -- Anthropic routes (through litellm) -------------------------------------------------------------

class FakeAnthropic:
    """A minimal Anthropic Messages endpoint on a local port: records each request body and
    answers with usage that reports cache reads and writes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        return web.json_response({
            "id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": f"answer {len(self.requests)}"}], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 100 * len(self.requests),
                      "cache_creation_input_tokens": 7},
        })

    @classmethod
    @contextlib.contextmanager
    def run(cls) -> Iterator[FakeAnthropic]:
        fake = cls()
        app = web.Application()
        app.router.add_post("/v1/messages", fake._messages)
        with in_thread(lambda: serve(app), "fake-anthropic") as port:
            fake.url = f"http://127.0.0.1:{port}"
            yield fake


def _anthropic_tenant(url: str, **context: Any) -> dict[str, Any]:
    return {"allow_unauthenticated": True, "memory": {"enabled": False}, "context": context,
            "models": {"*": route(url, "anthropic/claude-3-5-sonnet-20241022")}}


def _text_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


@pytest.mark.parametrize("switch", [True, False])
def test_anthropic_routes_get_a_breakpoint_at_the_end_of_the_stable_prefix(tmp_path: Path, switch: bool) -> None:
    with FakeAnthropic.run() as fake, running(write_config(tmp_path, {"local": _anthropic_tenant(fake.url, cache_breakpoints=switch)})) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="local", max_retries=0)
        history = [SYSTEM, {"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                   {"role": "user", "content": "second question"}]
        raw = sdk.chat.completions.with_raw_response.create(model="claude", messages=history, extra_headers={"X-Session-ID": "a"})
        sent = fake.requests[-1]
        marked = [(m["role"], p["text"]) for m in sent["messages"] for p in _text_parts(m) if "cache_control" in p]
        system_marked = [p["text"] for p in sent.get("system") or [] if "cache_control" in p]
        if switch:
            # The message before the newest turn (the stable prefix grows by appending after it) and
            # the end of the compacted part (here the system prompt).
            assert marked == [("assistant", "first answer")] and system_marked == [SYSTEM["content"]]
        else:
            assert marked == [] and system_marked == []
        # The provider's cache reads and writes, as litellm reports them, reach the accounting.
        assert raw.headers["x-context-cached-tokens"] == "100"
        view = httpx.get(f"{proxy.url}/admin/sessions/a").json()
        assert view["session"]["extra"]["cache"]["cache_creation_tokens"] == 7


def test_a_clients_own_anthropic_breakpoints_are_kept_and_none_added(tmp_path: Path) -> None:
    with FakeAnthropic.run() as fake, running(write_config(tmp_path, {"local": _anthropic_tenant(fake.url)})) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="local", max_retries=0)
        mine = {"role": "user", "content": [{"type": "text", "text": "a long document", "cache_control": {"type": "ephemeral"}}]}
        history = [SYSTEM, mine, {"role": "assistant", "content": "read it"}, {"role": "user", "content": "summarise it"}]
        sdk.chat.completions.create(model="claude", messages=history, extra_headers={"X-Session-ID": "b"})
        sent = fake.requests[-1]
        marked = [p["text"] for m in sent["messages"] for p in _text_parts(m) if "cache_control" in p]
        assert marked == ["a long document"]
        assert not any("cache_control" in p for p in sent.get("system") or [])


def test_breakpoints_skip_the_proxys_per_turn_blocks_and_leave_the_clients_messages_alone() -> None:
    summary = {"role": "system", "content": '<context-summary source="agent-state-proxy">\n...\n</context-summary>'}
    pinned = {"role": "user", "content": "My locker code is 4417."}
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    answer = {"role": "assistant", "content": "It is 42."}
    recalled = {"role": "user", "content": '<context-recalled source="agent-state-proxy">\nold\n</context-recalled>'}
    memories = {"role": "user", "content": HEADER + " (recalled by the proxy; ...):\n<memories>\n</memories>"}
    newest = {"role": "user", "content": "and now?"}
    messages = [SYSTEM, summary, pinned, call, result, answer, recalled, memories, newest]
    marked = caching.place_breakpoints(messages)
    assert [i for i, m in enumerate(marked) if isinstance(m["content"], list)] == [1, 5]
    assert marked[5]["content"] == [{"type": "text", "text": "It is 42.", "cache_control": {"type": "ephemeral"}}]
    assert messages[5] is answer and answer["content"] == "It is 42."  # the client's objects unchanged
    # A tool turn right before the newest message: the breakpoint goes on the last text message before it.
    marked = caching.place_breakpoints([SYSTEM, pinned, call, result, newest])
    assert [i for i, m in enumerate(marked) if isinstance(m["content"], list)] == [0, 1]
