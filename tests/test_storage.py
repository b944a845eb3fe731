"""Store conformance: every backend (in-memory, LMDB, PostgreSQL) and write-behind over each must pass these."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import codec
from proxy.codec import CorruptRecord
from proxy.records import Message, Session
from proxy.storage.base import InvalidWrite, Record, StorageError, Store, Write
from proxy.storage.kv import messages_prefix
from proxy.storage.lmdb_store import LmdbStore
from proxy.storage.memory import InMemoryStore
from proxy.storage.write_behind import WriteBehindStore


@pytest.fixture(params=["memory", "lmdb", "postgres", "write-behind:memory", "write-behind:lmdb", "write-behind:postgres",
                        "write-behind:postgres-many"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every backend, and the write-behind store the app runs over each (its queued writes and
    caches must answer exactly as the backend would; in fleet mode, postgres-many, it has none)."""
    kind = request.param.removeprefix("write-behind:")
    backend: Store
    if kind == "memory":
        backend = InMemoryStore()
    elif kind == "lmdb":
        backend = LmdbStore.open(str(tmp_path / "lmdb"))
    else:
        from proxy.storage.postgres import PostgresStore

        replicas = "many" if kind == "postgres-many" else "one"
        backend = await PostgresStore.open(await request.getfixturevalue("postgres_server").new_database(), replicas=replicas)
    if request.param.startswith("write-behind"):
        backend = WriteBehindStore(backend, flush_interval=0.01)
        await backend.start()
    yield backend
    await backend.close()


def session(tenant: str = "t", sid: str = "s1", **fields) -> Session:
    return Session(tenant=tenant, id=sid, created_at=1.0, last_active=2.0, **fields)


def message(seq: int, content: object = "hello", **fields) -> Message:
    return Message(seq=seq, parent=seq - 1 if seq else None, chain=f"{seq:032x}", role="user", body={"role": "user", "content": content}, ts=3.0, **fields)


async def test_round_trip_keeps_every_field(store: Store) -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"ü": [1, 2]}'}}]
    stored = Message(
        seq=0, parent=None, chain="ab" * 16, role="assistant", body={"role": "assistant", "content": None, "tool_calls": calls},
        ts=1.5, tokens=12, request_id="req-1", branch=2, model="m", latency_ms=3.25, finish_reason="tool_calls",
        outcome="aborted", alternatives=[{"role": "assistant", "content": "x"}], tags=["decision"], reverted=True, injected=["mem-1"],
    )
    meta = session(user_id="u", implicit=True, head=0, next_seq=1, branches=2, turns=3, prompt_tokens=4, completion_tokens=5, extra={"k": [1]})
    await store.commit(meta, [stored])
    assert await store.get_session("t", "s1") == meta
    assert await store.get_messages("t", "s1") == [stored]


async def test_messages_come_back_in_seq_order_across_commits(store: Store) -> None:
    for batch in ([2, 0], [1], [10, 3]):
        await store.commit(session(), [message(i, f"m{i}") for i in batch])
    assert [m.seq for m in await store.get_messages("t", "s1")] == [0, 1, 2, 3, 10]


async def test_upsert_overwrites_session_and_messages(store: Store) -> None:
    await store.commit(session(turns=1), [message(0)])
    await store.commit(session(turns=2), [message(0, reverted=True)])
    assert (await store.get_session("t", "s1")).turns == 2
    assert [m.reverted for m in await store.get_messages("t", "s1")] == [True]


async def test_tenants_are_isolated(store: Store) -> None:
    await store.commit(session("alpha", "same"), [message(0, "alpha data")])
    await store.commit(session("beta", "same"), [message(0, "beta data")])
    await store.put_records("alpha", [Record("memory", "m1", {"text": "alpha"})])
    assert [m.body["content"] for m in await store.get_messages("beta", "same")] == ["beta data"]
    assert await store.get_record("beta", "memory", "m1") is None
    assert await store.scan_records("beta", "memory") == []
    assert await store.delete_session("alpha", "same") is True
    assert await store.get_session("alpha", "same") is None
    assert [s.tenant for s in await store.list_sessions("beta")] == ["beta"]
    assert await store.get_messages("beta", "same") != []


async def test_tenant_names_that_prefix_each_other_do_not_leak(store: Store) -> None:
    await store.commit(session("ab", "x"), [message(0)])
    await store.commit(session("a", "x"), [message(0)])
    assert [s.tenant for s in await store.list_sessions("a")] == ["a"]


@pytest.mark.parametrize("sid", ["x" * 10_000, "ünïcødé 🚀 id", "with\nnewline and \0 nul", "s1/../../etc"])
async def test_arbitrary_session_ids(store: Store, sid: str) -> None:
    await store.commit(session(sid=sid), [message(0)])
    assert (await store.get_session("t", sid)).id == sid
    assert len(await store.get_messages("t", sid)) == 1
    assert await store.delete_session("t", sid) is True


async def test_unknown_things_are_empty(store: Store) -> None:
    assert await store.get_session("t", "nope") is None
    assert await store.get_messages("t", "nope") == []
    assert await store.delete_session("t", "nope") is False
    assert await store.list_sessions("t") == []


async def test_records_scoped_and_erased_with_their_session(store: Store) -> None:
    await store.commit(session(), [message(0)], [Record("checkpoint", "0001", {"n": 1}, "s1"), Record("checkpoint", "0002", {"n": 2}, "s1")])
    await store.put_records("t", [Record("memory", "m1", {"text": "kept"})])
    assert [k for k, _ in await store.scan_records("t", "checkpoint", "s1")] == ["0001", "0002"]
    assert await store.get_record("t", "checkpoint", "0002", "s1") == {"n": 2}
    await store.put_records("t", [Record("checkpoint", "0001", None, "s1")])  # None deletes
    assert [k for k, _ in await store.scan_records("t", "checkpoint", "s1")] == ["0002"]
    await store.delete_session("t", "s1")
    assert await store.scan_records("t", "checkpoint", "s1") == []
    assert await store.get_record("t", "memory", "m1") == {"text": "kept"}


async def test_one_apply_is_one_transaction(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.apply([Write("t", session(), [message(0)]), Write("t", records=[Record("k", "x" * 1000, {})])])
    assert await store.get_session("t", "s1") is None


async def test_a_routine_write_is_read_at_once_and_committed_before_any_later_durable_one(store: Store) -> None:
    await store.apply([Write("t", session(next_seq=1), [message(0, "routine")])], durable=False)
    await store.apply([Write("t", records=[Record("usage", "day", {"tokens": 1})])], durable=False)
    assert [m.body["content"] for m in await store.get_messages("t", "s1")] == ["routine"]
    assert await store.get_record("t", "usage", "day") == {"tokens": 1}
    await store.apply([Write("t", session(next_seq=2), [message(1, "durable")])])
    backend = getattr(store, "inner", store)  # below write-behind: what is committed
    assert [m.body["content"] for m in await backend.get_messages("t", "s1")] == ["routine", "durable"]
    assert await backend.get_record("t", "usage", "day") == {"tokens": 1}
    assert (await backend.get_session("t", "s1")).next_seq == 2


@pytest.mark.parametrize("durable", [True, False])
async def test_an_unstorable_write_is_refused_at_once_durable_or_not(store: Store, durable: bool) -> None:
    bad = message(0)
    bad.body["content"] = {"x": object()}
    with pytest.raises(InvalidWrite, match="message 0"):
        await store.apply([Write("t", session(), [bad])], durable=durable)
    with pytest.raises(InvalidWrite):
        await store.apply([Write("t", records=[Record("k", "x" * 1000, {})])], durable=durable)
    assert await store.get_session("t", "s1") is None and await store.scan_records("t", "k") == []


async def test_a_session_lock_is_held_for_its_block(store: Store) -> None:
    async with store.session_lock("t", "s1", refuse=True):
        await store.commit(session(), [message(0)])
    async with store.session_lock("t", "s1", refuse=False):  # let go after the block
        assert len(await store.get_messages("t", "s1")) == 1


async def test_concurrent_commits_all_land(store: Store) -> None:
    await asyncio.gather(*(store.commit(session(sid=f"s{i}"), [message(0, i)]) for i in range(50)))
    assert len(await store.list_sessions("t")) == 50


async def test_corrupt_message_is_quarantined_and_reads_go_on(store: Store) -> None:
    store = getattr(store, "inner", store)  # bytes corrupted below any cache: the backend's own read
    await store.commit(session(), [message(0), message(1), message(2)])
    await corrupt_message(store, "t", "s1", 1, b"\x01{garbage")
    assert [m.seq for m in await store.get_messages("t", "s1")] == [0, 2]
    found = await store.quarantined("t")
    assert len(found) == 1 and "garbage" not in found[0].reason
    assert [m.seq for m in await store.get_messages("t", "s1")] == [0, 2]


async def corrupt_message(store: Store, tenant: str, session_id: str, seq: int, raw: bytes) -> None:
    """Overwrite a stored message's bytes below the store's interface, as a bad disk would."""
    if hasattr(store, "_write"):
        key = messages_prefix(tenant, session_id) + seq.to_bytes(8, "big")
        await store._write(lambda txn: txn.put(key, raw))  # type: ignore[attr-defined]
        return
    from proxy.storage.kv import session_digest

    async with store._connection() as connection:  # type: ignore[attr-defined]
        await connection.execute("UPDATE asp_messages SET record = $4 WHERE tenant = $1 AND sid = $2 AND seq = $3",
                                 tenant, session_digest(session_id), seq, raw)


async def test_lmdb_survives_reopen_and_grows_its_map(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    store = LmdbStore.open(path, map_size=64 * 1024)
    with pytest.raises(StorageError):
        LmdbStore.open(path)  # one environment per path per process
    big = "x" * 20_000
    for i in range(100):
        await store.commit(session(), [message(i, big)])
    await store.close()
    reopened = LmdbStore.open(path)
    assert len(await reopened.get_messages("t", "s1")) == 100
    assert reopened.stats()["map_size"] > 64 * 1024
    await reopened.close()


async def test_lmdb_write_failure_is_loud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LmdbStore.open(str(tmp_path / "db"))

    original = store._write_now

    def disk_full(txn):
        raise lmdb.DiskError("No space left on device")

    def full_disk(fn):  # the failure happens inside the real write transaction
        return original(disk_full)

    monkeypatch.setattr(store, "_write_now", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        await store.commit(session(), [message(0)])
    monkeypatch.undo()
    assert await store.get_session("t", "s1") is None
    await store.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_corrupt_record(raw: bytes) -> None:
    try:
        assert isinstance(codec.decode(raw), dict)
    except CorruptRecord:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_encode_decode_round_trip(record: dict) -> None:
    assert codec.decode(codec.encode(record)) == record


@pytest.mark.parametrize("limit", [1, 3, 7, 50])
async def test_paged_scan_reads_everything_once_even_with_queued_writes(store: Store, limit: int) -> None:
    from proxy.storage.write_behind import WriteBehindStore

    await store.put_records("t", [Record("memory", f"k{i:03d}", {"i": i}) for i in range(0, 40, 2)])
    await store.put_records("t", [Record("memory", "other", {"i": -1}), Record("note", "k001", {"i": -2})])
    behind = WriteBehindStore(store, flush_interval=3600)  # never flushes by itself here
    queued = [Record("memory", f"k{i:03d}", {"i": i}) for i in range(1, 40, 4)]  # new keys between stored ones
    queued += [Record("memory", f"k{i:03d}", None) for i in range(4, 30, 2)]  # deletes whole pages of stored ones
    await behind.apply([Write("t", records=queued)], durable=False)
    expected = await behind.scan_records("t", "memory", prefix="k")
    assert [k for k, _ in expected] == sorted({f"k{i:03d}" for i in (0, 2, 30, 32, 34, 36, 38)} | {f"k{i:03d}" for i in range(1, 40, 4)})
    for reader in (behind, store):
        pages, after = [], ""
        while page := await reader.scan_records("t", "memory", prefix="k", after=after, limit=limit):
            assert len(page) <= limit or reader is behind
            pages.append(page)
            after = page[-1][0]
        got = [row for page in pages for row in page]
        want = expected if reader is behind else await store.scan_records("t", "memory", prefix="k")
        assert got == want


async def test_write_behind_transcript_cache_is_bounded_by_messages_and_stays_exact() -> None:
    from proxy.storage.write_behind import WriteBehindStore

    behind = WriteBehindStore(InMemoryStore(), cached_messages=10, flush_interval=3600)
    for sid in ("a", "b", "c"):
        await behind.apply([Write("t", session(sid=sid, next_seq=6), [message(i, f"{sid}{i}") for i in range(6)])])
        assert [m.body["content"] for m in await behind.get_messages("t", sid)] == [f"{sid}{i}" for i in range(6)]
        assert behind._transcripts.weight == sum(len(behind._transcripts.peek(k)) for k in behind._transcripts) <= 10
    assert list(behind._transcripts) == [("t", "c")]  # the newest stays (each was read once); older ones were dropped
    # A queued (not yet flushed) write reaches a cached transcript and an evicted one alike.
    await behind.apply([Write("t", session(sid="a", next_seq=7), [message(6, "a6")])], durable=False)
    await behind.apply([Write("t", session(sid="c", next_seq=7), [message(6, "c6")])], durable=False)
    assert behind._transcripts.weight == sum(len(behind._transcripts.peek(k)) for k in behind._transcripts) <= 10
    assert [m.body["content"] for m in await behind.get_messages("t", "a")][-2:] == ["a5", "a6"]
    assert [m.body["content"] for m in await behind.get_messages("t", "c")][-2:] == ["c5", "c6"]
    await behind.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.text(max_size=2)), max_size=6), max_size=8))
def test_a_cached_transcript_reads_back_in_seq_order_whatever_its_writes(writes: list[list[tuple[int, str]]]) -> None:
    """Appends keep the cached order; a rewritten or out-of-order seq rebuilds it: a read is
    always every message's latest version, in seq order."""
    from proxy.storage.write_behind import _Transcript

    transcript, latest = _Transcript([]), {}
    for write in writes:
        messages = [message(seq, text) for seq, text in write]
        transcript.update(messages)
        latest.update((m.seq, m) for m in messages)
        got = transcript.messages()
        assert [m.seq for m in got] == sorted(latest) and all(m is latest[m.seq] for m in got)
        got.clear()  # a caller's list is its own
        assert len(transcript.messages()) == len(transcript) == len(latest)


async def test_write_behind_keeps_a_session_in_steady_use_through_a_burst_of_other_sessions() -> None:
    from proxy.storage.write_behind import WriteBehindStore

    class Counting(InMemoryStore):
        reads: list[str] = []

        async def get_messages(self, tenant: str, session_id: str) -> list:
            Counting.reads.append(session_id)
            return await super().get_messages(tenant, session_id)

    inner = Counting()
    for sid in ["hot"] + [f"burst{i}" for i in range(30)]:
        await inner.apply([Write("t", session(sid=sid, next_seq=5), [message(i, f"{sid}{i}") for i in range(5)])])
    behind = WriteBehindStore(inner, cached_messages=20, flush_interval=3600)  # room for 4 transcripts
    for _ in range(5):
        await behind.get_messages("t", "hot")
    for i in range(30):  # each burst session twice: it gets in, but only in place of another burst session
        for _ in range(2):
            await behind.get_messages("t", f"burst{i}")
        assert ("t", "hot") in behind._transcripts
    Counting.reads.clear()
    assert [m.body["content"] for m in await behind.get_messages("t", "hot")] == [f"hot{i}" for i in range(5)]
    assert Counting.reads == []  # from memory
    assert behind.stats()["transcript_cache"]["weight"] <= 20
    await behind.close()


async def test_write_behind_keeps_stored_sessions_exact_without_reading_them_back() -> None:
    from proxy.storage.write_behind import WriteBehindStore

    class Counting(InMemoryStore):
        reads = 0

        async def get_session(self, tenant: str, session_id: str) -> Session | None:
            Counting.reads += 1
            return await super().get_session(tenant, session_id)

    inner = Counting()
    await inner.apply([Write("t", session(sid="old", next_seq=3))])  # written before this process
    behind = WriteBehindStore(inner, cached_sessions=2, flush_interval=3600)
    assert (await behind.get_session("t", "old")).next_seq == 3 and Counting.reads == 1
    got = await behind.get_session("t", "old")
    assert Counting.reads == 1  # the second read came from memory
    got.next_seq, got.extra["note"] = 99, "caller's own copy"
    assert (await behind.get_session("t", "old")).next_seq == 3 and not (await behind.get_session("t", "old")).extra
    # Writes, durable or queued then flushed, are what the next read sees.
    await behind.apply([Write("t", session(sid="old", next_seq=4))])
    assert (await behind.get_session("t", "old")).next_seq == 4
    await behind.apply([Write("t", session(sid="old", next_seq=5))], durable=False)
    await behind.flush()
    assert (await behind.get_session("t", "old")).next_seq == 5 and Counting.reads == 1
    assert (await inner.get_session("t", "old")).next_seq == 5
    await behind.delete_session("t", "old")
    assert await behind.get_session("t", "old") is None
    # Bounded: the least recently used session is read from the store again.
    for sid in ("a", "b", "c"):
        await behind.apply([Write("t", session(sid=sid, next_seq=1))])
    reads = Counting.reads
    assert (await behind.get_session("t", "a")).next_seq == 1 and Counting.reads == reads + 1
    assert (await behind.get_session("t", "c")).next_seq == 1 and Counting.reads == reads + 1
    await behind.close()


async def test_write_behind_without_a_transcript_cache_reads_the_store_every_time() -> None:
    from proxy.storage.write_behind import WriteBehindStore

    inner = InMemoryStore()
    behind = WriteBehindStore(inner, cached_messages=0, flush_interval=3600)
    await behind.apply([Write("t", session(sid="a", next_seq=2), [message(0, "a0"), message(1, "a1")])])
    assert [m.body["content"] for m in await behind.get_messages("t", "a")] == ["a0", "a1"]
    assert not behind._transcripts and behind._transcripts.weight == 0
    await behind.apply([Write("t", session(sid="a", next_seq=3), [message(2, "a2")])], durable=False)
    assert [m.body["content"] for m in await behind.get_messages("t", "a")] == ["a0", "a1", "a2"]
    await behind.close()
    assert [m.body["content"] for m in await inner.get_messages("t", "a")] == ["a0", "a1", "a2"]


def test_decoded_messages_share_their_repeated_strings() -> None:
    import orjson

    from proxy.records import Message

    def decoded(seq: int) -> Message:
        record = {"seq": seq, "parent": None, "chain": f"c{seq}", "role": "assistant", "ts": 1.0, "tokens": 3,
                  "tokenizer": "o200k_base", "model": "openai/gpt-4o-mini", "finish_reason": "stop", "outcome": "ok",
                  "body": {"role": "assistant", "content": f"reply {seq}"}}
        return Message.from_dict(orjson.loads(orjson.dumps(record)))

    a, b = decoded(1), decoded(2)
    assert a.role is b.role and a.tokenizer is b.tokenizer and a.model is b.model and a.outcome is b.outcome
    assert a.body["role"] is b.body["role"] and a.finish_reason is b.finish_reason
    assert a.body["content"] == "reply 1" and b.seq == 2 and a == decoded(1)


async def test_a_transcript_read_back_shares_its_parents_and_request_ids(store: Store) -> None:
    turn = [message(seq, f"m{seq}", request_id=f"req-{seq // 2:024d}") for seq in range(300, 306)]
    await store.commit(session(), turn)
    got = await store.get_messages("t", "s1")
    assert got == turn  # equal values...
    for before, after in zip(got, got[1:]):
        assert after.parent is before.seq  # ...one object each (ints above 256 are not cached)
    assert got[0].request_id is got[1].request_id and got[2].request_id is got[3].request_id
    assert got[1].request_id is not got[2].request_id

