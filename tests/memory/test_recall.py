"""Recall: what a request recalls, read back from the store and injected (lexical search here:
the embedder is not loaded, so every recall says it is degraded and why)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from proxy.memory.model import Memory, Scope
from proxy.memory.recall import Recaller, query_text, recall_for, shorten, visible
from proxy.storage.base import Write
from proxy.storage.memory import InMemoryStore
from tests.memory.units import memory, tenant_state


@dataclass
class _Turn:
    """The parts of the pipeline's turn a recall reads and writes."""

    text: str
    user: str | None = "u"
    tenant: Any = field(default_factory=lambda: SimpleNamespace(name="t"))
    headers: dict[str, str] = field(default_factory=dict)
    injected: list[str] | None = None

    def __post_init__(self) -> None:
        self.ref = SimpleNamespace(user_id=self.user)
        self.session = SimpleNamespace(id="s", user_id=None)
        self.body: dict[str, Any] = {"messages": [{"role": "user", "content": self.text}]}


async def _recaller(*texts: str) -> tuple[Recaller, Any, InMemoryStore, list[Memory]]:
    state = tenant_state()
    state.ready.set()
    store = InMemoryStore()
    memories = [memory(state, text) for text in texts]
    await store.apply([Write("t", records=[r for m in memories for r in m.records()])])
    state.insert(memories)
    return Recaller({"t": state}, store), state, store, memories


async def test_a_recall_injects_the_matching_memory_and_says_it_was_lexical_only() -> None:
    recaller, state, _, memories = await _recaller("The office moved to Lyon in March", "Lunch on Fridays is pasta")
    turn = _Turn("Where is the office now?")
    recall = recaller.begin_recall(turn)
    assert recall is not None and recall.query == turn.text and recall.scope == Scope("user", "u", "s")
    await recaller.finish_recall(turn, recall)
    assert turn.injected == [memories[0].id] and turn.headers["X-Memory-Ids"] == memories[0].id
    assert turn.headers["X-Memory-Degraded"] == "embedder-loading"
    assert "Lyon" in str(turn.body["messages"]) and "pasta" not in str(turn.body["messages"])
    assert state.counters["recalls"] == 1 and state.counters["memories_injected"] == 1 and len(state.latencies) == 1


async def test_small_talk_and_a_tenant_still_loading_recall_nothing() -> None:
    recaller, state, _, _ = await _recaller("The office moved to Lyon in March")
    assert recaller.begin_recall(_Turn("thanks, great!")) is None and state.counters["small_talk"] == 1
    state.ready.clear()
    turn = _Turn("Where is the office now?")
    assert recaller.begin_recall(turn) is None and turn.headers["X-Memory-Status"] == "loading"
    assert recaller.embed_query("t", turn.body) is None


async def test_a_memory_erased_from_the_store_is_not_injected_and_is_forgotten() -> None:
    recaller, state, store, memories = await _recaller("The office moved to Lyon in March")
    await store.apply([Write("t", records=Memory.erasure(memories[0].id, None))])  # erased by another path
    turn = _Turn("Where is the office now?")
    recall = recaller.begin_recall(turn)
    assert recall is not None
    await recaller.finish_recall(turn, recall)
    assert turn.injected is None and "X-Memory-Ids" not in turn.headers
    assert state.counters["stale_dropped"] == 1 and state.memory.alive == 0  # and out of the index queue's way
    assert state.ops.get_nowait().keys == (memories[0].key,)


async def test_another_users_memory_is_not_recalled() -> None:
    recaller, _, _, _ = await _recaller("The office moved to Lyon in March")
    turn = _Turn("Where is the office now?", user="someone-else")
    recall = recaller.begin_recall(turn)
    if recall is not None:
        await recaller.finish_recall(turn, recall)
    assert turn.injected is None and "Lyon" not in str(turn.body)


def test_the_query_is_the_newest_user_message_and_a_long_one_is_shortened_for_embedding() -> None:
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"}, {"role": "user", "content": "second"}, "junk"]
    assert query_text(messages) == "second" and query_text([]) == ""
    long = "start " + "x" * 1000 + " end"
    short = shorten(long)
    assert len(short) < 300 and short.startswith("start") and short.endswith("end") and shorten("short") == "short"


def test_recall_for_and_visibility_rules() -> None:
    state = tenant_state()
    assert recall_for(state.memory, "Where is the office?") is None  # nothing to search
    state.insert([memory(state, "The office moved to Lyon")])
    assert recall_for(state.memory, "Where is the office?") == "search" and recall_for(state.memory, "hi!") == "small talk"
    mine = memory(state, "mine", user="alice")
    assert visible(Scope("user", "alice", "s"), mine) and not visible(Scope("user", "bob", "s"), mine)
    assert visible(Scope("tenant", None, "s"), mine) and not visible(Scope("session", None, "s"), mine)
