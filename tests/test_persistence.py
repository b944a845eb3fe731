"""Persistence modes, checkpoints, repair, rollback, fork and idempotency through the real proxy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from proxy import checkpoints
from proxy.records import Message, Session
from proxy.storage.base import Write
from proxy.storage.memory import InMemoryStore
from proxy.storage.write_behind import WriteBehindStore
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, local_proxy, open_tenant, write_config


def running(tmp_path: Path, upstream: FakeUpstream, **tenant) -> ProxyThread:
    return local_proxy(tmp_path, upstream.base_url, **tenant)


def converse(proxy: ProxyThread, session: str, turns: int, start: int = 0) -> list[dict]:
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    history: list[dict] = []
    for turn in range(start, start + turns):
        history.append({"role": "user", "content": f"turn {turn}"})
        sdk.chat.completions.create(model="fake-model", messages=[history[-1]], extra_headers={"X-Session-ID": session})
        history.append({"role": "assistant", "content": f"echo: turn {turn}"})
    return history


def view(proxy: ProxyThread, session: str) -> dict:
    return httpx.get(f"{proxy.url}/admin/sessions/{session}").json()


def test_checkpoints_are_taken_kept_and_valid(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(tmp_path, upstream, persistence={"checkpoint_every_messages": 4, "keep_checkpoints": 3}) as proxy:
        converse(proxy, "cp", 10)
        listed = httpx.get(f"{proxy.url}/admin/sessions/cp/checkpoints").json()["data"]
    assert len(listed) == 3 and all(c["valid"] for c in listed)
    assert [c["seq"] for c in listed] == sorted(c["seq"] for c in listed)


def test_rollback_by_turns_then_continue_through_the_sdk(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(tmp_path, upstream) as proxy:
        converse(proxy, "rb", 3)
        report = httpx.post(f"{proxy.url}/admin/sessions/rb/rollback", json={"turns": 2}).json()
        assert len(report["reverted"]) == 4
        converse(proxy, "rb", 1, start=10)
        sent = upstream.chat_requests[-1]["messages"]
        assert [m["content"] for m in sent] == ["turn 0", "echo: turn 0", "turn 10"]  # reverted turns not restored
        state = view(proxy, "rb")
    reverted = [m for m in state["messages"] if m["reverted"]]
    assert len(reverted) == 4 and not any(m["active"] for m in reverted)  # kept for audit, off the path


def test_rollback_to_checkpoint_restores_counters(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(tmp_path, upstream, persistence={"checkpoint_every_messages": 2}) as proxy:
        converse(proxy, "rc", 1)
        first = httpx.get(f"{proxy.url}/admin/sessions/rc/checkpoints").json()["data"][0]
        converse(proxy, "rc", 2, start=1)
        report = httpx.post(f"{proxy.url}/admin/sessions/rc/rollback", json={"checkpoint": first["id"]}).json()
        assert report["head"] == first["head"] and len(report["reverted"]) == 4
        assert view(proxy, "rc")["session"]["turns"] == 1
        bad = httpx.post(f"{proxy.url}/admin/sessions/rc/rollback", json={"checkpoint": "nope"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "checkpoint_not_found"
        for body in ({}, {"turns": 0}, {"turns": 99}, {"turns": 1, "checkpoint": first["id"]}, [1]):
            assert httpx.post(f"{proxy.url}/admin/sessions/rc/rollback", json=body).status_code == 400


def test_fork_starts_a_new_session_that_continues(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(tmp_path, upstream) as proxy:
        converse(proxy, "origin", 3)
        forked = httpx.post(f"{proxy.url}/admin/sessions/origin/fork", json={"turns": 1, "session_id": "branch-b"})
        assert forked.status_code == 201 and forked.json()["messages"] == 4
        converse(proxy, "branch-b", 1, start=20)
        assert [m["content"] for m in upstream.chat_requests[-1]["messages"]][-1] == "turn 20"
        assert len(upstream.chat_requests[-1]["messages"]) == 5
        assert len(view(proxy, "origin")["messages"]) == 6  # the source is untouched
        assert httpx.post(f"{proxy.url}/admin/sessions/origin/fork", json={"session_id": "branch-b"}).status_code == 409


@pytest.mark.parametrize("stream", [False, True])
def test_idempotency_key_replays_the_recorded_answer(tmp_path: Path, upstream: FakeUpstream, stream: bool) -> None:
    with running(tmp_path, upstream) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        headers = {"X-Session-ID": "idem", "Idempotency-Key": "retry-123"}
        question = [{"role": "user", "content": "charge the card once"}]

        def ask() -> tuple[str, dict]:
            raw = sdk.chat.completions.with_raw_response.create(model="fake-model", messages=question, stream=stream, extra_headers=headers)
            parsed = raw.parse()
            text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) if stream else parsed.choices[0].message.content
            return text, dict(raw.headers)

        first, _ = ask()
        second, replay_headers = ask()
        assert first == second == "echo: charge the card once"
        assert replay_headers["idempotent-replayed"] == "true"
        assert len(upstream.chat_requests) == 1  # the model was called once
        assert len(view(proxy, "idem")["messages"]) == 2


def test_corrupt_session_record_is_repaired_from_checkpoint_and_messages(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(tmp_path, upstream, persistence={"checkpoint_every_messages": 2, "mode": "sync"}) as proxy:
        converse(proxy, "hurt", 3)
        from proxy.server import keys
        from proxy.storage.kv import session_key

        inner = proxy.app[keys.STORE].inner
        key = session_key("local", "hurt")
        proxy.call(inner._write(lambda txn: txn.put(key, b"\x01{broken")))
        # A session still cached is served from memory and its next write replaces the damaged
        # record; one read back from LMDB (evicted, or after a restart) must be repaired.
        proxy.app[keys.STORE]._stored_sessions.clear()
        converse(proxy, "hurt", 1, start=3)  # an agent that forgot: history must still be restored
        assert len(upstream.chat_requests[-1]["messages"]) == 7
        recovery = httpx.get(f"{proxy.url}/admin/recovery").json()
        assert recovery["repaired_sessions"][0]["session"] == "hurt"
        assert recovery["quarantined"] and recovery["quarantined"][0]["reason"]
        assert len(view(proxy, "hurt")["messages"]) == 8


def test_flipped_bytes_in_checkpoints_fall_back_to_an_older_one() -> None:
    session = Session(tenant="t", id="s", created_at=1, last_active=1, next_seq=2, head=1)
    older = checkpoints.make(session, None, 10.0)
    session.next_seq, session.head = 4, 3
    newer_key, newer = checkpoints.make(session, None, 20.0)
    flipped = dict(newer, seq=5)  # a flipped byte in a number: checksum no longer matches
    assert checkpoints.problem(flipped) == "checksum mismatch"
    assert checkpoints.newest_valid([older, (newer_key, flipped)]) == older
    assert checkpoints.problem({"format": 99}) == "unknown format"


async def test_write_behind_backpressure_and_read_your_writes() -> None:
    inner = InMemoryStore()
    store = WriteBehindStore(inner, batch_size=4, flush_interval=10.0, queue_max=8)
    await store.start()
    session = Session(tenant="t", id="s", created_at=1, last_active=1)
    for seq in range(8):
        session.next_seq = seq + 1
        message = Message(seq=seq, parent=None, chain=f"{seq}", role="user", body={"role": "user", "content": seq}, ts=1)
        await store.apply([Write("t", session, [message])], durable=False)
    assert len(await store.get_messages("t", "s")) == 8  # visible before any flush
    assert (await store.get_session("t", "s")).next_seq == 8
    extra = Message(seq=8, parent=None, chain="8", role="user", body={"role": "user", "content": 8}, ts=1)
    session.next_seq = 9
    await asyncio.wait_for(store.apply([Write("t", session, [extra])], durable=False), 5)  # waited for room
    await store.close()
    assert len(await inner.get_messages("t", "s")) == 9


def test_async_mode_flushes_on_sigterm(tmp_path: Path, upstream: FakeUpstream) -> None:
    from tests.harness import ProxyProcess

    config = write_config(tmp_path, {"local": open_tenant(upstream.base_url, persistence={"mode": "async"})}, storage={"data_dir": str(tmp_path / "data"), "flush_interval_ms": 60_000})
    proxy = ProxyProcess(config).start()
    try:
        converse(proxy, "drain", 3)  # acknowledged, still queued: the flush interval is a minute
    finally:
        assert proxy.stop() == 0, proxy.log()
    proxy.start()
    try:
        assert len(httpx.get(f"{proxy.url}/admin/sessions/drain").json()["messages"]) == 6
    finally:
        proxy.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_full_disk_is_loud_and_never_acknowledged(tmp_path: Path, upstream: FakeUpstream, stream: bool) -> None:
    import lmdb

    with running(tmp_path, upstream, persistence={"mode": "sync"}) as proxy:
        from proxy.server import keys

        inner = proxy.app[keys.STORE].inner
        real_write = inner._write_now

        def failing_put(txn):
            raise lmdb.DiskError("No space left on device")

        inner._write_now = lambda fn: real_write(failing_put)  # fails inside a real transaction
        body = {"model": "fake-model", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers={"X-Session-ID": "full"})
        if stream:
            assert response.status_code == 200
            events = [line for line in response.text.splitlines() if line.startswith("data: ")]
            assert "storage_error" in events[-1] and "[DONE]" not in response.text
        else:
            assert response.status_code == 503 and response.json()["error"]["code"] == "storage_error"


async def test_transcript_cache_follows_every_write() -> None:
    import dataclasses

    store = WriteBehindStore(InMemoryStore(), flush_interval=10.0)
    await store.start()
    session = Session(tenant="t", id="s", created_at=1, last_active=1, next_seq=1, head=0)
    first = Message(seq=0, parent=None, chain="0", role="user", body={"role": "user", "content": "a"}, ts=1)
    await store.apply([Write("t", session, [first])])
    assert [m.seq for m in await store.get_messages("t", "s")] == [0]  # now cached
    second = Message(seq=1, parent=0, chain="1", role="assistant", body={"role": "assistant", "content": "b"}, ts=1)
    await store.apply([Write("t", session, [second])], durable=False)
    assert [m.seq for m in await store.get_messages("t", "s")] == [0, 1]
    await store.apply([Write("t", session, [dataclasses.replace(second, reverted=True)])])
    assert [m.reverted for m in await store.get_messages("t", "s")] == [False, True]
    await store.delete_session("t", "s")
    assert await store.get_messages("t", "s") == []
    await store.close()


def test_inconsistency_names_what_a_session_record_gets_wrong_about_its_messages() -> None:
    """The check every request makes (on messages in seq order, as stores return them)."""
    def msg(seq: int, parent: int | None, reverted: bool = False) -> Message:
        return Message(seq=seq, parent=parent, chain=f"c{seq}", role="user", body={"role": "user", "content": str(seq)}, ts=0.0, reverted=reverted)

    messages = [msg(0, None), msg(1, 0), msg(3, 1), msg(7, 3), msg(8, 1, reverted=True)]  # gaps, a branch, a revert

    def record(head: int | None, next_seq: int) -> Session:
        return Session(tenant="t", id="s", created_at=0.0, last_active=0.0, head=head, next_seq=next_seq)

    assert checkpoints.inconsistency(record(7, 9), messages) is None
    assert checkpoints.inconsistency(record(3, 9), messages) is None  # a head inside the tree
    assert checkpoints.inconsistency(record(7, 8), messages) == "next_seq behind the stored messages"
    for missing in (2, 5, 9, -1):  # in a gap, past the end, before the start
        assert checkpoints.inconsistency(record(missing, 10), messages) == "head message missing"
    assert checkpoints.inconsistency(record(None, 9), messages) == "head missing"
    assert checkpoints.inconsistency(record(None, 9), [msg(0, None, reverted=True)]) is None  # all rolled back
    assert checkpoints.inconsistency(None, messages) == "session record missing"
    assert checkpoints.inconsistency(record(None, 0), []) is None
