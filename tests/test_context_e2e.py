"""Context management end to end: the real proxy, the fake provider, the official OpenAI SDK."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from proxy import tokens
from proxy.context.budget import request_overhead
from proxy.context.summarizer import PROMPT_MARKER
from proxy.memory.inject import HEADER
from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, context_settled, keyed_tenant, open_tenant, route, start_thread, write_config

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PIN = "My name is Ada Lovelace and my locker code is 4417."
BUDGET = {"max_context_tokens": 1200, "reserve_completion_tokens": 200}  # 1000 prompt tokens
PROMPT_BUDGET = 1000
ENCODING = tokens.encoding_for("openai/fake-model")
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"item": {"type": "integer"}}}}}]


class Summarizer:
    """The fake provider's answers to the proxy's summarizer prompt; counts the calls."""

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.down = False
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str | None:
        messages = body.get("messages") or []
        if not is_summarizer_call(body):
            return None  # a client request: the fake's default echo
        with self._lock:
            self.inputs.append(messages[1]["content"])
        if self.down:
            raise RuntimeError("summarizer is down")  # the fake answers 500
        numbers = sorted({w.strip(".,:") for w in messages[1]["content"].split() if w.strip(".,:").isdigit()}, key=int)
        return "- The user discussed items " + ", ".join(numbers[:12]) + "."


def is_summarizer_call(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    return bool(messages) and messages[0].get("role") == "system" and str(messages[0].get("content")).startswith(PROMPT_MARKER)


def client_requests(fake: FakeUpstream) -> list[dict[str, Any]]:
    return [b for b in fake.chat_requests if not is_summarizer_call(b)]


@pytest.fixture
def summarizer(upstream: FakeUpstream) -> Summarizer:
    upstream.responder = Summarizer()
    return upstream.responder


def tenant(upstream: FakeUpstream, **context: Any) -> dict[str, Any]:
    spec = open_tenant(upstream.base_url)
    spec["models"]["summarizer"] = route(upstream.base_url, "openai/fake-summarizer")
    spec["context"] = {**BUDGET, "window_turns": 4, "segment_turns": 4, "summary_tokens": 64, "summarizer_model": "summarizer"} | context
    return spec


@pytest.fixture
def context_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    with start_thread(write_config(tmp_path, {"local": tenant(upstream)})) as running:
        yield running


def sdk(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="local", max_retries=0)


def prompt_tokens(body: dict[str, Any], encoding: str) -> int:
    """Prompt tokens of a whole chat request as the context budget counts them."""
    return request_overhead(body, encoding) + sum(tokens.count_message(m, encoding) for m in body.get("messages") or ())


def admin_session(proxy: ProxyThread, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/admin/sessions/{session_id}", headers={"Authorization": "Bearer local"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_background(proxy: ProxyThread) -> None:
    context_settled(proxy)


def converse(proxy: ProxyThread, session: str, turns: int, *, tool_every: int = 0) -> list[Any]:
    """An agent that keeps only its last few turns itself (the proxy restores the rest)."""
    client, history, headers, raw_responses = sdk(proxy), [], {"X-Session-ID": session}, []
    for t in range(turns):
        text = PIN if t == 2 else f"Turn {t}: tell me about item {t}, which costs {t * 3} dollars and ships on day {t % 28 + 1}."
        if tool_every and t % tool_every == tool_every - 1:
            history.append({"role": "user", "content": f'CALL_TOOL:lookup {{"item": {t}}}'})
            call = client.chat.completions.create(model="fake-model", messages=[SYSTEM, *history], tools=TOOLS, extra_headers=headers)
            message = call.choices[0].message
            calls = [c.model_dump() for c in message.tool_calls]
            history.append({"role": "assistant", "content": None, "tool_calls": calls})
            history.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": f"item {t} is in stock: {t * 7} units"})
        else:
            history.append({"role": "user", "content": text})
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=[SYSTEM, *history], extra_headers=headers)
        raw_responses.append(raw)
        history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
        while sum(m["role"] == "user" for m in history) > 3:  # drop the oldest turn, whole
            history.pop(0)
            while history and history[0]["role"] != "user":
                history.pop(0)
    return raw_responses


def assert_tool_pairs_intact(messages: list[dict[str, Any]]) -> None:
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            ids = [c["id"] for c in message["tool_calls"]]
            assert [m.get("tool_call_id") for m in messages[i + 1:i + 1 + len(ids)]] == ids
        if message.get("role") == "tool":
            assert messages[i - 1].get("tool_calls") and message["tool_call_id"] in [c["id"] for c in messages[i - 1]["tool_calls"]]


def test_300_turns_stay_within_budget_keep_pins_and_tool_pairs_and_reuse_summaries(
    context_proxy: ProxyThread, upstream: FakeUpstream, summarizer: Summarizer
) -> None:
    responses = converse(context_proxy, "long", 300, tool_every=10)
    wait_for_background(context_proxy)

    forwarded = client_requests(upstream)
    assert len(forwarded) == 330  # 300 turns, 30 of them with a tool call first
    for body in forwarded:
        assert prompt_tokens(body, ENCODING) <= PROMPT_BUDGET
        # The system prompt leads, verbatim; recalled memories of the turns the context compressed
        # (the budget kept room for them) come in a message before the newest user message.
        assert body["messages"][0] == SYSTEM
        assert_tool_pairs_intact(body["messages"])
    # Memory and context share the budget: requests with recalled memories stayed within it (on a
    # compacted request memories get at most tail_share_of_saved of what compaction saved: so
    # early on, while little is saved, fewer requests have room for one).
    assert sum(any(HEADER in str(m.get("content")) for m in b["messages"]) for b in forwarded) > 50
    pin_index = next(i for i, b in enumerate(forwarded) if b["messages"][-1].get("content") == PIN)
    for body in forwarded[pin_index:]:
        assert {"role": "user", "content": PIN} in body["messages"]  # pinned: verbatim in every request
    assert any("context-summary" in str(b["messages"][1].get("content")) for b in forwarded)

    # Every summary was computed once: no summarizer input repeats, and each call left one record.
    assert summarizer.inputs and len(summarizer.inputs) == len(set(summarizer.inputs))
    view = admin_session(context_proxy, "long")
    stored = view["summaries"]
    assert len(stored) == len(summarizer.inputs)
    assert {s["method"] for s in stored} == {"llm"} and {s["level"] for s in stored} == {"segment", "session"}
    for summary in stored:
        assert summary["seqs"] and summary["first"] == summary["seqs"][0] and summary["last"] == summary["seqs"][-1]

    last = responses[-1].headers
    assert int(last["x-context-tokens"]) <= PROMPT_BUDGET and int(last["x-context-tokens-saved"]) > 0
    stats = view["session"]["extra"]["context"]
    assert stats["requests"] == 330 and stats["compressed"] > 200
    assert stats["tokens_saved"] == stats["tokens_full"] - stats["tokens_sent"] > stats["tokens_sent"]
    # The client's own messages are stored as sent: the summaries never replace them.
    contents = [m["body"].get("content") for m in view["messages"]]
    assert PIN in contents and not any("context-summary" in str(c) for c in contents)
    assert next(m for m in view["messages"] if m["body"].get("content") == PIN)["tags"] == ["fact"]


def test_summarizer_down_falls_back_to_extractive_summaries(
    context_proxy: ProxyThread, upstream: FakeUpstream, summarizer: Summarizer
) -> None:
    summarizer.down = True
    converse(context_proxy, "down", 80)
    wait_for_background(context_proxy)
    forwarded = client_requests(upstream)
    assert len(forwarded) == 80 and summarizer.inputs  # the summarizer was asked, and failed
    assert all(prompt_tokens(b, ENCODING) <= PROMPT_BUDGET for b in forwarded)
    assert {"role": "user", "content": PIN} in forwarded[-1]["messages"]
    stored = admin_session(context_proxy, "down")["summaries"]
    assert stored and {s["method"] for s in stored} == {"extractive"}
    # Extractive summaries keep the numbers the conversation named.
    assert any("dollars" in s["text"] for s in stored)


def test_short_conversations_are_forwarded_unchanged(context_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    messages = [SYSTEM, {"role": "user", "content": "hello"}]
    raw = sdk(context_proxy).chat.completions.with_raw_response.create(model="fake-model", messages=messages, extra_headers={"X-Session-ID": "short"})
    assert upstream.chat_requests[-1]["messages"] == messages
    assert raw.headers["x-context-tokens-saved"] == "0"
    assert int(raw.headers["x-context-tokens"]) == prompt_tokens({"messages": messages}, ENCODING)


def test_a_newest_message_larger_than_the_budget_is_a_clear_error(context_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    huge = " ".join(f"word{i}" for i in range(3000))
    with pytest.raises(openai.BadRequestError) as error:
        sdk(context_proxy).chat.completions.create(model="fake-model", messages=[SYSTEM, {"role": "user", "content": huge}])
    body = error.value.body
    assert error.value.status_code == 400 and body["code"] == "context_length_exceeded"
    assert "max_context_tokens 1200" in body["message"] and "unknown to litellm" in body["message"]
    assert not upstream.chat_requests  # nothing was truncated and sent


def test_context_off_and_stateless_tenants_forward_everything(tmp_path: Path, upstream: FakeUpstream) -> None:
    off = tenant(upstream, strategy="off")
    stateless = keyed_tenant(upstream.base_url, "k2", stateless=True, context=BUDGET)
    with start_thread(write_config(tmp_path, {"off": off, "plain": stateless})) as proxy:
        long = [SYSTEM] + [{"role": "user", "content": f"message {i} " + "filler " * 40} for i in range(40)]
        for key in ("local", "k2"):
            raw = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0).chat.completions.with_raw_response.create(
                model="fake-model", messages=long
            )
            assert upstream.chat_requests[-1]["messages"] == long
            assert "x-context-tokens" not in raw.headers


def test_shutdown_cancels_background_summaries(tmp_path: Path, upstream: FakeUpstream) -> None:
    with FakeUpstream.run_in_thread() as slow:
        slow.hang_next(1000)  # the summarizer never answers
        spec = tenant(upstream, summarize_at_fraction=0.3, summarizer_timeout_seconds=600)
        spec["models"]["summarizer"] = {"model": "openai/slow", "api_base": slow.base_url, "api_key": "x"}
        # Context only: once memory is ready the context keeps room for its block, this small
        # budget then needs a summary at once, and that request would wait on the hung summarizer
        # (depending on when memory finished loading: a flaky test, not the point of this one).
        spec["memory"] = {"enabled": False}
        proxy = start_thread(write_config(tmp_path, {"local": spec}))
        with proxy:
            converse(proxy, "bg", 16)
            context = proxy.app[keys.PIPELINE].context
            assert context._tasks  # summarizing in the background, not in the requests
            assert all(prompt_tokens(b, ENCODING) <= PROMPT_BUDGET for b in client_requests(upstream))
        assert not context._tasks and slow.chat_requests


def test_room_kept_for_memories_never_makes_a_request_wait_for_summaries(tmp_path: Path, upstream: FakeUpstream) -> None:
    # With memory on, the context keeps room for the memory block. At this small budget that
    # room alone would need a summary at once, from a summarizer that never answers: the
    # request must use the whole budget instead and give the memory block what is left.
    from tests.memory_helpers import drain

    with FakeUpstream.run_in_thread() as slow:
        slow.hang_next(1000)
        spec = tenant(upstream, summarize_at_fraction=0.3, summarizer_timeout_seconds=600)
        spec["models"]["summarizer"] = {"model": "openai/slow", "api_base": slow.base_url, "api_key": "x"}
        with start_thread(write_config(tmp_path, {"local": spec})) as proxy:
            drain(proxy)  # memory loaded: from now on the context keeps room for its block
            done = []
            worker = threading.Thread(target=lambda: done.append(converse(proxy, "room", 16)), daemon=True)
            worker.start()
            worker.join(60)  # waiting on the summarizer would take 600 s
            assert done, "a request waited for the hung summarizer"
            assert all(prompt_tokens(b, ENCODING) <= PROMPT_BUDGET for b in client_requests(upstream))
            assert slow.chat_requests  # summaries were asked for, in the background


def test_llm_tagger_adds_tags_in_the_background(tmp_path: Path, upstream: FakeUpstream) -> None:
    def responder(body: dict[str, Any]) -> str | None:
        if "importance tagger" in str(body["messages"][0].get("content")):
            numbers = [line.split("]")[0].strip("[") for line in body["messages"][1]["content"].splitlines()]
            return json.dumps({"labels": {numbers[0]: ["decision"]}})
        return None

    upstream.responder = responder
    spec = tenant(upstream, tagger_model="summarizer")
    with start_thread(write_config(tmp_path, {"local": spec})) as proxy:
        sdk(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "ok then"}], extra_headers={"X-Session-ID": "tags"})
        wait_for_background(proxy)
        tags = proxy.call(proxy.app[keys.STORE].scan_records("local", "tags", "tags"))
    assert tags == [("0000000000", {"tags": ["decision"], "model": "summarizer"})]


def test_reusing_the_previous_requests_view_changes_nothing_sent(tmp_path: Path, upstream: FakeUpstream, monkeypatch) -> None:
    """The manager builds each request's view from the session's previous one (the Items and
    units of the history both share). Through trimmed histories, tool calls, an edited early
    turn (a branch) and sessions taking turns, what goes upstream is what a proxy without that cache
    sends. Summaries and memory are off so that background timing cannot differ between the two."""
    from proxy.context import manager

    def run(cached_messages: int, directory: Path) -> list[list[dict[str, Any]]]:
        monkeypatch.setattr(manager, "_CACHED_VIEW_MESSAGES", cached_messages)
        before = len(client_requests(upstream))
        # No cap on the retrieved turns (tail_share_of_saved: a cost rule): this test wants them.
        spec = tenant(upstream, strategy=["window", "importance", "retrieval"], segment_turns=3, tail_share_of_saved=None)
        spec["memory"] = {"enabled": False}  # its block would depend on when its index is ready
        with start_thread(write_config(directory, {"local": spec})) as proxy:
            converse(proxy, "first", 14, tool_every=4)
            # An agent that keeps its whole history, then edits an early turn: a branch.
            client, history, headers = sdk(proxy), [SYSTEM], {"X-Session-ID": "edited"}

            def ask(text: str) -> None:
                history.append({"role": "user", "content": text})
                answer = client.chat.completions.create(model="fake-model", messages=history, extra_headers=headers)
                history.append({"role": "assistant", "content": answer.choices[0].message.content})

            for t in range(24):
                ask(f"Turn {t}: what about item {t}, priced {t * 5} dollars, delivered on day {t + 2} to warehouse {t % 3}?")
            # It rewrites turn 6 and resends everything after it: the branch forks far back.
            history[1 + 2 * 6] = {"role": "user", "content": "Turn 6, edited: what about the zeppelin hangar instead?"}
            for t in range(24, 30):  # the first asks about the edited turn: retrieval should find it
                ask("So the zeppelin hangar: which one, again?" if t == 24 else f"Turn {t}: what about item {t}, priced {t * 5} dollars?")
            converse(proxy, "second", 6)
            converse(proxy, "first", 3)
        sent = json.dumps([b["messages"] for b in client_requests(upstream)[before:]])
        ids: dict[str, str] = {}  # the fake numbers tool calls across runs: number them per run
        return json.loads(re.sub(r"call_fake_\d+_\d+", lambda m: ids.setdefault(m.group(0), f"call_{len(ids)}"), sent))

    cached, uncached = run(100_000, tmp_path / "cached"), run(0, tmp_path / "uncached")
    assert len(cached) == len(uncached) == 14 + 3 + 24 + 6 + 6 + 3  # 3 tool calls
    branch = cached[17 + 24:17 + 30]
    assert all(len(m) < 49 for m in branch)  # the budget shaped the branch's requests
    assert any("zeppelin hangar instead" in str(m.get("content")) for m in branch[0][:-1])  # retrieved: the edited text
    assert cached == uncached


def test_a_restored_session_without_summaries_has_each_made_once(tmp_path: Path, upstream: FakeUpstream, monkeypatch) -> None:
    """A long stored session whose summaries are missing (recorded with context management
    off, or stored before them): the first request makes the extractive summaries it needs
    at once, and, without a summarizer model, keeps them; the background pass must not make
    them all again (~80 of 1.5-3 ms each for a 1,000-message session, on the event loop)."""
    from proxy.context import summaries as summary_store, summary_maker
    from proxy.storage.base import Record, Write

    spec = tenant(upstream, summarizer_model=None)
    config = write_config(tmp_path, {"local": spec})
    with start_thread(config) as proxy:
        history = converse_plain(proxy, "long", 40)
        wait_for_background(proxy)
    with start_thread(config) as proxy:  # fresh caches; drop every stored summary
        store = proxy.app[keys.STORE]
        stored = proxy.call(summary_store.load(store, "local", "long"))
        assert len(stored) > 8
        proxy.call(store.apply([Write("local", records=[Record(summary_store.KIND, key, None, "long") for key in stored])]))
        made: list[str] = []
        original = summary_maker.extractive_segment

        def counted(segment, *args, **kwargs):
            made.append(segment.key)
            return original(segment, *args, **kwargs)

        monkeypatch.setattr(summary_maker, "extractive_segment", counted)
        response = sdk(proxy).chat.completions.with_raw_response.create(
            model="fake-model", messages=[SYSTEM, *history[-6:], {"role": "user", "content": "and the next item?"}],
            extra_headers={"X-Session-ID": "long"})
        assert int(response.headers["X-History-Restored"]) > 60
        wait_for_background(proxy)
        assert len(made) > 8 and len(made) == len(set(made)), made  # each segment summarized once
        assert set(proxy.call(summary_store.load(store, "local", "long"))) >= set(made)  # and kept


def converse_plain(proxy: ProxyThread, session: str, turns: int) -> list[dict[str, Any]]:
    """``turns`` turns resending the whole history (the proxy stores all of it)."""
    client, history = sdk(proxy), []
    for t in range(turns):
        history.append({"role": "user", "content": f"Turn {t}: tell me about item {t}, which costs {t * 3} dollars and ships on day {t % 28 + 1}."})
        reply = client.chat.completions.create(model="fake-model", messages=[SYSTEM, *history], extra_headers={"X-Session-ID": session})
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return history


@pytest.mark.parametrize("window_turns,segment_turns", [(8, 6), (4, 3)])
def test_the_background_pass_makes_summaries_before_any_request_needs_them(
    tmp_path: Path, upstream: FakeUpstream, summarizer: Summarizer, monkeypatch, window_turns: int, segment_turns: int
) -> None:
    """An agent that pauses between turns (the background work runs meanwhile): no request
    waits for a summary, even as the window lets go of a segment every few turns, because each
    pass also summarizes the segments about to leave it. The pass builds its view on the
    cached view of the session's latest request: the same segments as a view built from scratch."""
    from proxy.context import manager as manager_module
    from proxy.context.units import Item, build_view
    from proxy.transcript import active_path

    waited: list[int] = []
    original = manager_module.ContextManager._fill

    async def counted(self, ref, view, available, result, settings, budget):
        waited.append(len(result.missing))
        return await original(self, ref, view, available, result, settings, budget)

    monkeypatch.setattr(manager_module.ContextManager, "_fill", counted)
    spec = tenant(upstream, summarize_at_fraction=0.5, window_turns=window_turns, segment_turns=segment_turns)
    with start_thread(write_config(tmp_path, {"local": spec})) as proxy:
        client, history, headers = sdk(proxy), [], {"X-Session-ID": "paced"}
        compacted = 0
        for t in range(60):
            history.append({"role": "user", "content": f"Turn {t}: tell me about item {t}, which costs {t * 3} dollars and ships on day {t % 28 + 1}."})
            raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=[SYSTEM, *history[-7:]], extra_headers=headers)
            history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
            compacted += int(raw.headers["X-Context-Tokens-Saved"]) > 0
            wait_for_background(proxy)
        assert compacted > 40 and len(summarizer.inputs) >= 8  # the window moved on, many times
        assert waited == []

        context, store = proxy.app[keys.PIPELINE].context, proxy.app[keys.STORE]
        session = proxy.call(store.get_session("local", "paced"))
        path = active_path(proxy.call(store.get_messages("local", "paced")), session.head)
        ref = manager_module._Session(proxy.app[keys.CONFIG].tenants["local"], "paced", session.created_at)
        reused = proxy.call(context._stored_view(ref, path, ENCODING))
        fresh = build_view([Item(m.body, m.tokens, m.seq, (), len(m.body["content"])) for m in path], segment_turns)
        assert len(reused.items) == len(path) and reused.items[0] is context._views.peek(next(iter(context._views))).view.items[0]
        assert [(s.lo, s.hi, s.key, s.session_key) for s in reused.segments] == [(s.lo, s.hi, s.key, s.session_key) for s in fresh.segments]
        assert len(fresh.segments) >= 60 // segment_turns - 1


def test_summaries_kept_in_memory_are_bounded_and_read_back_when_needed(
    tmp_path: Path, upstream: FakeUpstream, summarizer: Summarizer, monkeypatch
) -> None:
    """The summaries cache holds a bounded number of summaries; a session whose summaries were
    let go of reads them back from the store instead of making them again."""
    from proxy.context import manager as manager_module

    monkeypatch.setattr(manager_module, "_CACHED_SUMMARIES", 20)
    with start_thread(write_config(tmp_path, {"local": tenant(upstream)})) as proxy:
        for session in ("one", "two", "three", "one"):
            converse(proxy, session, 30)
            wait_for_background(proxy)
        context = proxy.app[keys.PIPELINE].context
        assert 0 < context._summaries.weight <= 20 and len(context._summaries) < 3  # not every session's
        stored = sum(len(admin_session(proxy, s)["summaries"]) for s in ("one", "two", "three"))
        assert stored > 20
        assert len(summarizer.inputs) == stored  # one summarizer call per stored summary: none made twice (the sessions say the same)
