"""SessionLifecycle: expiry, deletion, rollback and fork change the store, long-term memory and the
context's caches together, under the session's lock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy import janitor, transcript
from proxy.config import load_config
from proxy.context.manager import ContextManager
from proxy.errors import Conflict, NotFound, ProxyError
from proxy.lifecycle import SessionLifecycle, is_expired, same_session
from proxy.records import Message, Session
from proxy.storage.base import Write
from proxy.storage.memory import InMemoryStore
from tests.harness import open_tenant, write_config


class _Memory:
    """Long-term memory as the lifecycle uses it: what it was told to forget."""

    def __init__(self) -> None:
        self.sessions: list[tuple[str, str]] = []
        self.messages: list[tuple[str, str, list[int]]] = []

    async def forget_session(self, tenant: str, session_id: str) -> int:
        self.sessions.append((tenant, session_id))
        return 0

    async def forget_messages(self, tenant: str, session_id: str, seqs: Any) -> int:
        self.messages.append((tenant, session_id, list(seqs)))
        return 0


def _tenant(tmp_path: Path, **extra: Any):
    return load_config(write_config(tmp_path, {"local": open_tenant("http://127.0.0.1:9/v1", **extra)})).tenants["local"]


async def _session(store: InMemoryStore, session_id: str, turns: int, last_active: float = 100.0) -> Session:
    """A session of ``turns`` user/assistant exchanges, as the pipeline records them."""
    messages, chain, parent = [], transcript.ROOT_CHAIN, None
    for seq in range(2 * turns):
        body = {"role": "user" if seq % 2 == 0 else "assistant", "content": f"message {seq}"}
        chain = transcript.chain_hash(chain, body)
        messages.append(Message(seq=seq, parent=parent, chain=chain, role=body["role"], body=body, ts=float(seq)))
        parent = seq
    session = Session(tenant="local", id=session_id, created_at=1.0, last_active=last_active, head=parent, next_seq=len(messages), turns=turns)
    await store.apply([Write("local", session, messages)])
    return session


def _lifecycle(store: InMemoryStore) -> tuple[SessionLifecycle, _Memory, ContextManager]:
    context = ContextManager(store, None)  # type: ignore[arg-type]  # no summaries are made here
    lifecycle = SessionLifecycle(store, context)
    lifecycle.memory = memory = _Memory()
    return lifecycle, memory, context


def _cache_in_context(context: ContextManager, session_id: str) -> None:
    context.tags.cache.put(("local", session_id), (1.0, {0: ["decision"]}))
    context._passes.put(("local", session_id), (1.0, 4, None))
    context.summaries.cache.put(("local", session_id), (1.0, {}))


def _cached_in_context(context: ContextManager, session_id: str) -> bool:
    key = ("local", session_id)
    return key in context.tags.cache or key in context._passes or key in context.summaries.cache


async def test_delete_erases_the_session_its_memories_and_the_contexts_cache() -> None:
    store = InMemoryStore()
    lifecycle, memory, context = _lifecycle(store)
    await _session(store, "s", 2)
    _cache_in_context(context, "s")
    assert await lifecycle.delete("local", "s") is True
    assert await store.get_session("local", "s") is None and await store.get_messages("local", "s") == []
    assert memory.sessions == [("local", "s")] and not _cached_in_context(context, "s")
    assert await lifecycle.delete("local", "s") is False  # nothing left: the route answers 404


async def test_delete_waits_for_the_request_in_flight() -> None:
    store = InMemoryStore()
    lifecycle, memory, _ = _lifecycle(store)
    await _session(store, "s", 1)
    async with lifecycle.hold("local", "s", refuse_when_busy=False):
        deleting = asyncio.ensure_future(lifecycle.delete("local", "s"))
        await asyncio.sleep(0.01)
        assert not deleting.done() and await store.get_session("local", "s") is not None
    assert await deleting is True and memory.sessions == [("local", "s")]


async def test_an_expired_session_starts_over_and_a_live_one_is_kept(tmp_path: Path) -> None:
    tenant = _tenant(tmp_path, session_ttl_seconds=60)
    store = InMemoryStore()
    lifecycle, memory, context = _lifecycle(store)
    old = await _session(store, "old", 1, last_active=100.0)
    live = await _session(store, "live", 1, last_active=150.0)
    _cache_in_context(context, "old")
    assert is_expired(tenant, old, 200.0) and not is_expired(tenant, live, 200.0)
    assert await lifecycle.expire(tenant, live, 200.0) is live
    assert await lifecycle.expire(tenant, old, 200.0) is None
    assert await store.get_session("local", "old") is None and await store.get_session("local", "live") is not None
    assert memory.sessions == [("local", "old")] and not _cached_in_context(context, "old")
    assert await lifecycle.expire(tenant, None, 200.0) is None


async def test_the_janitor_forgets_what_it_deletes_through_the_lifecycle(tmp_path: Path) -> None:
    tenant = _tenant(tmp_path, session_ttl_seconds=60)
    store = InMemoryStore()
    lifecycle, memory, _ = _lifecycle(store)
    await _session(store, "old", 1, last_active=100.0)
    await _session(store, "live", 1, last_active=190.0)
    assert await janitor.sweep(store, [tenant], 200.0, on_delete=lifecycle.forget) == 1
    assert memory.sessions == [("local", "old")]


async def test_rollback_reverts_turns_and_forgets_their_memories_and_cached_summaries() -> None:
    store = InMemoryStore()
    lifecycle, memory, context = _lifecycle(store)
    await _session(store, "s", 3)
    _cache_in_context(context, "s")
    report = await lifecycle.rollback("local", "s", {"turns": 1}, now=500.0)
    assert report["head"] == 3 and report["reverted"] == [4, 5]
    session = await store.get_session("local", "s")
    assert session.head == 3 and [m.seq for m in await store.get_messages("local", "s") if m.reverted] == [4, 5]
    assert memory.messages == [("local", "s", [4, 5])] and not _cached_in_context(context, "s")
    with pytest.raises(NotFound):
        await lifecycle.rollback("local", "gone", {"turns": 1}, now=500.0)
    with pytest.raises(ProxyError):  # a bad spec changes nothing, forgets nothing
        await lifecycle.rollback("local", "s", {"turns": 9}, now=500.0)
    assert len(memory.messages) == 1


async def test_fork_copies_the_path_and_refuses_an_id_in_use() -> None:
    store = InMemoryStore()
    lifecycle, _, _ = _lifecycle(store)
    await _session(store, "s", 3)
    admitted: list[str] = []

    async def admit(new_id: str) -> None:
        admitted.append(new_id)

    source, forked = await lifecycle.fork("local", "s", {"session_id": "copy", "turns": 1}, 500.0, admit=admit)
    assert source.id == "s" and forked.id == "copy" and forked.head == 3 and admitted == ["copy"]
    copied = await store.get_messages("local", "copy")
    assert [m.body["content"] for m in copied if not m.reverted] == [f"message {n}" for n in range(4)]
    assert same_session(await store.get_session("local", "copy"), forked.created_at)

    with pytest.raises(Conflict):
        await lifecycle.fork("local", "s", {"session_id": "s"}, 500.0)
    with pytest.raises(Conflict):  # exists already
        await lifecycle.fork("local", "s", {"session_id": "copy"}, 500.0)
    async with lifecycle.hold("local", "busy", refuse_when_busy=False):  # a request is creating it
        with pytest.raises(Conflict):
            await lifecycle.fork("local", "s", {"session_id": "busy"}, 500.0)

    async def refuse(new_id: str) -> None:
        raise ProxyError("too many sessions", status=429)

    with pytest.raises(ProxyError):
        await lifecycle.fork("local", "s", {"session_id": "other"}, 500.0, admit=refuse)
    assert await store.get_session("local", "other") is None


def test_same_session_tells_a_new_incarnation_from_the_old() -> None:
    first = Session(tenant="local", id="s", created_at=1.0, last_active=1.0)
    again = Session(tenant="local", id="s", created_at=2.0, last_active=2.0)
    assert same_session(first, 1.0) and not same_session(again, 1.0) and not same_session(None, 1.0)
