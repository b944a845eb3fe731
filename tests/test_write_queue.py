"""A write that cannot be stored fails its own request and nothing else (issue: write-queue poisoning).

Every case first reproduces what used to poison the write-behind queue, then checks what a user
of *other* sessions notices: their routine and critical turns are acknowledged and survive a
restart, and the operator can see what was set aside.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import codec
from proxy.records import Message, Session
from proxy.storage.base import InvalidWrite, Write
from proxy.storage.memory import InMemoryStore
from proxy.storage.write_behind import WriteBehindStore
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, local_config


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def chat(url: str, session: str, messages: list[dict], stream: bool = False) -> httpx.Response:
    body = {"model": "fake-model", "messages": messages, "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-ID": session}, timeout=30)


def contents(url: str, session: str) -> list[str]:
    found = httpx.get(f"{url}/admin/sessions/{session}", timeout=10)
    assert found.status_code == 200, found.text
    return [m["body"].get("content") for m in found.json()["messages"]]


def poison_requests() -> list[tuple[list[dict], bool]]:
    """The bodies that poisoned the queue: a deep key on a streamed message; the same on an early
    message the context window drops (not streamed); the fuzz culprit (deep cache_control)."""
    deep = {"role": "user", "content": "hi", "x": nested(253)}
    early = [{"role": "user", "content": "early", "x": nested(253)}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "later"}]
    culprit = {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": nested(255)}]}
    return [([deep], True), (early, False), ([culprit], True)]


def assert_other_sessions_are_durable(proxy: ProxyProcess, upstream: FakeUpstream, config: Path, tag: str, kill: bool) -> None:
    routine = chat(proxy.url, f"routine-{tag}", [{"role": "user", "content": "a routine turn"}])
    critical = chat(proxy.url, f"critical-{tag}", [{"role": "user", "content": "I prefer tea"}], stream=True)
    assert routine.status_code == 200 and critical.status_code == 200
    assert "[DONE]" in critical.text and '"error"' not in critical.text
    assert httpx.get(proxy.url + "/ready").status_code == 200
    if kill:
        proxy.kill()
    else:
        assert proxy.stop() == 0  # SIGTERM flushes and exits
    again = ProxyProcess(config).start()
    try:
        assert contents(again.url, f"routine-{tag}") == ["a routine turn", "echo: a routine turn"]
        assert contents(again.url, f"critical-{tag}") == ["I prefer tea", "echo: I prefer tea"]
    finally:
        again.stop()


@pytest.mark.parametrize("mode,kill", [("hybrid", False), ("sync", True)])
def test_unstorable_requests_fail_alone_and_later_turns_survive_restart(tmp_path: Path, upstream: FakeUpstream, mode: str, kill: bool) -> None:
    config = local_config(tmp_path, upstream.base_url, persistence={"mode": mode})
    proxy = ProxyProcess(config).start()
    try:
        for index, (messages, stream) in enumerate(poison_requests()):
            calls = len(upstream.chat_requests)
            refused = chat(proxy.url, f"poison-{index}", messages, stream=stream)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["type"] == "invalid_request_error"
            assert len(upstream.chat_requests) == calls  # refused before the provider was paid for it
        assert_other_sessions_are_durable(proxy, upstream, config, mode, kill)
    finally:
        if proxy.process and proxy.process.poll() is None:
            proxy.stop()


def test_deep_memory_metadata_is_refused_and_the_memory_api_keeps_working(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url)
    proxy = ProxyProcess(config).start()
    try:
        deadline = 60
        while deadline and httpx.get(proxy.url + "/v1/memories").status_code == 503:  # memory still loading
            deadline -= 1
            asyncio.run(asyncio.sleep(0.5))
        for depth in (251, 252):
            refused = httpx.post(proxy.url + "/v1/memories", json={"content": "deep", "metadata": {"m": nested(depth)}})
            assert refused.status_code == 400, refused.text
        added = httpx.post(proxy.url + "/v1/memories", json={"content": "the user's cat is called Miso", "user_id": "u1"})
        assert added.status_code in (200, 201), added.text
        listed = httpx.get(proxy.url + "/v1/memories")
        assert listed.status_code == 200 and [m["content"] for m in listed.json()["data"]] == ["the user's cat is called Miso"]
        searched = httpx.post(proxy.url + "/v1/memories/search", json={"query": "cat Miso", "user_id": "u1"})
        assert searched.status_code == 200 and searched.json()["data"]
        assert_other_sessions_are_durable(proxy, upstream, config, "memory", kill=False)
    finally:
        if proxy.process and proxy.process.poll() is None:
            proxy.stop()


# -- the write-behind store itself -------------------------------------------------------------


class RefusingStore(InMemoryStore):
    """A backend that refuses (with a non-storage error) every write of one session: the kind of
    failure the flusher used to die of silently."""

    def __init__(self, refused_session: str) -> None:
        super().__init__()
        self.refused_session = refused_session
        self.closed = False

    async def apply(self, writes, durable: bool = True) -> None:
        if any(w.session is not None and w.session.id == self.refused_session for w in writes):
            raise TypeError("cannot serialise this write")
        await super().apply(writes)

    async def close(self) -> None:
        self.closed = True


def turn(session_id: str, seq: int, text: str) -> Write:
    session = Session(tenant="t", id=session_id, created_at=1.0, last_active=1.0, head=seq, next_seq=seq + 1)
    message = Message(seq=seq, parent=seq - 1 if seq else None, chain=f"c{seq}", role="user", body={"role": "user", "content": text}, ts=1.0)
    return Write("t", session, [message])


async def test_a_write_the_backend_refuses_is_quarantined_and_the_rest_commit() -> None:
    inner = RefusingStore("bad")
    store = WriteBehindStore(inner, flush_interval=0.01)
    await store.start()
    await store.apply([turn("good", 0, "one")], durable=False)
    await store.apply([turn("bad", 0, "refused")], durable=False)
    await store.apply([turn("good", 1, "two")], durable=False)
    await store.apply([turn("critical", 0, "I prefer tea")])  # durable, with the bad write queued before it
    for _ in range(200):
        if not store.pending:
            break
        await asyncio.sleep(0.01)
    assert store.pending == 0
    assert [m.body["content"] for m in await inner.get_messages("t", "good")] == ["one", "two"]
    assert [m.body["content"] for m in await inner.get_messages("t", "critical")] == ["I prefer tea"]
    assert await store.get_messages("t", "bad") == []  # reads no longer show what was never stored
    quarantined = await store.quarantined("t")
    assert [q.key for q in quarantined] == ["write:bad"] and "TypeError" in quarantined[0].reason
    assert store.stats()["quarantined_writes"] == 1 and store.health() is None
    await store.apply([turn("good", 2, "three")], durable=False)
    await store.close()
    assert inner.closed and [m.body["content"] for m in await inner.get_messages("t", "good")] == ["one", "two", "three"]


async def test_an_unstorable_write_is_refused_before_it_is_queued() -> None:
    inner = InMemoryStore()
    store = WriteBehindStore(inner, flush_interval=0.01)
    await store.start()
    bad = turn("s", 0, "x")
    bad.messages[0].body["x"] = nested(codec.MAX_DEPTH + 5)
    for durable in (True, False):
        with pytest.raises(InvalidWrite, match="message 0"):
            await store.apply([bad], durable=durable)
    assert store.pending == 0
    await store.apply([turn("s", 0, "fine")])
    await store.close()
    assert [m.body["content"] for m in await inner.get_messages("t", "s")] == ["fine"]


async def test_a_failing_disk_is_reported_and_close_still_closes() -> None:
    class FailingDisk(RefusingStore):
        async def apply(self, writes, durable: bool = True) -> None:
            from proxy.storage.base import StorageError
            raise StorageError("disk full")

    inner = FailingDisk("none")
    store = WriteBehindStore(inner, flush_interval=0.01)
    await store.start()
    await store.apply([turn("s", 0, "waiting")], durable=False)
    for _ in range(200):
        if store.health() is not None:
            break
        await asyncio.sleep(0.01)
    assert "disk full" in (store.health() or "") and store.stats()["flush_failure"] == "disk full"
    await store.close()
    assert inner.closed


async def test_a_record_stored_too_deep_before_the_bound_is_quarantined_not_fatal() -> None:
    inner = InMemoryStore()
    await inner.apply([turn("s", 0, "kept"), turn("s", 1, "deep")])
    key = next(k for k in inner.raw() if k.startswith(b"m") and k.endswith((1).to_bytes(8, "big")))
    legacy = codec.decode(inner.raw()[key])
    legacy["body"]["x"] = nested(250)  # what the old code accepted: readable, never sendable
    import orjson
    inner.raw()[key] = b"\x01" + orjson.dumps(legacy)  # format 1: as the versions before the bound wrote it
    assert [m.body["content"] for m in await inner.get_messages("t", "s")] == ["kept"]
    assert [q.reason for q in await inner.quarantined("t")] == [f"record nested deeper than {codec.MAX_DEPTH} levels"]


async def test_each_record_is_encoded_once_durable_or_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a write encodes it; the commit of a queued write reuses those bytes, and a durable
    write is checked by its own commit, so no record is encoded twice (each costs CPU per request)."""
    from proxy.storage import base

    encoded: list[object] = []
    real = codec.encode
    monkeypatch.setattr(base.codec, "encode", lambda value: encoded.append(value) or real(value))
    inner = InMemoryStore()
    store = WriteBehindStore(inner, flush_interval=3600)
    queued, durable = turn("s", 0, "queued"), turn("s", 1, "durable")
    await store.apply([queued], durable=False)
    assert len(encoded) == 2  # the session and its message, when checked
    await store.flush()
    assert len(encoded) == 2
    await store.apply([durable])
    assert len(encoded) == 4
    await store.close()
    assert [m.body["content"] for m in await inner.get_messages("t", "s")] == ["queued", "durable"]
