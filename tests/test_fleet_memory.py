"""Long-term memory in fleet mode: two replicas (separate processes) on one PostgreSQL, each
with its own index, kept in step through the database's change log (proxy/memory/fleet_sync.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, open_tenant, write_config
from tests.memory_helpers import SLOW_OK, recalled_block
from tests.test_fleet import stop

HOTEL = "For the Lisbon offsite we settled on the Alfama Lighthouse hotel and a budget of 4200 euros."


@pytest.fixture
def database(postgres_server) -> str:
    return asyncio.run(postgres_server.new_database())


def replica(tmp_path: Path, upstream: FakeUpstream, database: str, name: str) -> ProxyProcess:
    directory = tmp_path / name
    storage = {"data_dir": str(directory / "data"), "backend": "postgres",
               "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many"}}
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "top_k": 3})
    return ProxyProcess(write_config(directory, {"local": tenant}, storage=storage), env={"TEST_DATABASE_URL": database}).start()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def search(proxy: ProxyProcess, query: str, **scope: Any) -> dict[str, Any]:
    body = {"query": query, "scope": "tenant", "min_score": 0.2} | scope
    response = httpx.post(f"{proxy.url}/v1/memories/search", json=body, timeout=30)
    if response.status_code == 503:  # memory still loading
        return {"data": [], "degraded": "loading"}
    assert response.status_code == 200, response.text
    return response.json()


def ready(proxy: ProxyProcess) -> bool:
    stats = httpx.get(f"{proxy.url}/admin/memory", timeout=30).json()
    return stats["ready"] and stats["embedder"]["ready"]


def test_a_memory_added_on_one_replica_is_recalled_by_meaning_on_the_other_and_its_delete_too(
        tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    a = replica(tmp_path, upstream, database, "a")
    b = c = None
    try:
        b = replica(tmp_path, upstream, database, "b")
        wait_for("both replicas' memory ready", lambda: ready(a) and ready(b))
        added = httpx.post(f"{a.url}/v1/memories", json={"content": "The user's dog is named Biscuit and loves the beach"}, timeout=30)
        assert added.status_code == 200, added.text
        memory_id = added.json()["id"]

        def found_on_b() -> dict[str, Any] | None:
            hits = [m for m in search(b, "puppy at the seaside")["data"] if m["id"] == memory_id]
            return hits[0] if hits else None

        hit = wait_for("the memory added on A found on B", found_on_b)
        assert hit["similarity"] is not None and hit["similarity"] > 0.2 and hit["lexical"] == 0  # by meaning: no shared word
        assert httpx.get(f"{b.url}/v1/memories/{memory_id}", timeout=30).json()["content"].startswith("The user's dog")

        c = replica(tmp_path, upstream, database, "c")  # a replica started later builds its index from PostgreSQL
        wait_for("C's memory ready", lambda: ready(c))
        assert [m["id"] for m in search(c, "puppy at the seaside")["data"]] == [memory_id]
        assert httpx.get(f"{c.url}/admin/memory", timeout=30).json()["index"]["unembedded"] == 0  # its vector came from PostgreSQL

        assert httpx.delete(f"{a.url}/v1/memories/{memory_id}", timeout=30).status_code == 200
        wait_for("the delete on A seen on B", lambda: found_on_b() is None)
        assert httpx.get(f"{b.url}/v1/memories/{memory_id}", timeout=30).status_code == 404
        assert httpx.get(f"{b.url}/admin/memory", timeout=30).json()["index"]["memories"] == 0
        wait_for("the delete on A seen on C", lambda: httpx.get(f"{c.url}/v1/memories/{memory_id}", timeout=30).status_code == 404)
    finally:
        stop([r for r in (a, b, c) if r is not None])


def test_a_turn_recorded_through_one_replica_is_recalled_through_the_other_in_a_new_session(
        tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    a = replica(tmp_path, upstream, database, "a")
    b = None
    try:
        b = replica(tmp_path, upstream, database, "b")
        wait_for("both replicas' memory ready", lambda: ready(a) and ready(b))
        headers = {"X-User-ID": "alice"}
        sdk_a, sdk_b = (openai.OpenAI(base_url=r.base_url, api_key="x", max_retries=0, timeout=60) for r in (a, b))
        sdk_a.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": HOTEL}],
                                      extra_headers=headers | {"X-Session-ID": "planning"})
        wait_for("the turn indexed on A seen on B",
                 lambda: any("Alfama" in m["content"] for m in search(b, "offsite hotel", scope="user", user_id="alice")["data"]))
        # Indexed once for the fleet: by A, which recorded it; B only followed A's writes. (Read
        # before B records a turn of its own, which B indexes.)
        wait_for("A counting what it indexed",  # B may see it a moment before A's indexer counts it
                 lambda: httpx.get(f"{a.url}/admin/memory", timeout=30).json()["counters"].get("indexed", 0) >= 1, timeout=10)
        counters = [httpx.get(f"{r.url}/admin/memory", timeout=30).json()["counters"] for r in (a, b)]
        assert counters[0].get("indexed", 0) >= 1 and counters[1].get("indexed", 0) == 0, counters
        assert counters[1].get("fleet_changes_applied", 0) >= 1, counters
        raw = sdk_b.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "Remember when we discussed the offsite hotel? Which one did we pick?"}],
            extra_headers=headers | {"X-Session-ID": "later"})
        assert raw.headers.get("x-memory-ids"), dict(raw.headers)
        assert "Alfama Lighthouse" in recalled_block(upstream.chat_requests[-1])
    finally:
        stop([r for r in (a, b) if r is not None])


def test_a_turn_left_unindexed_by_a_replica_that_died_is_indexed_by_another(tmp_path: Path, upstream: FakeUpstream,
                                                                             database: str) -> None:
    """A replica recorded a turn (in PostgreSQL the turn is owed to episodic indexing) and died
    before indexing it: the debt, unpaid for longer than the grace period, is claimed by a live
    replica, which indexes it and settles it."""
    from proxy.records import Message, Session
    from proxy.storage.postgres import PostgresStore

    async def recorded_by_a_replica_that_died() -> None:
        store = await PostgresStore.open(database, replicas="many")
        try:
            feed = store.memory_feed()
            await feed.register(["local"])
            now = time.time()
            session = Session("local", "orphan", now, now, user_id="alice", head=1, next_seq=2, turns=1)
            await store.commit(session, [Message(0, None, "c0", "user", {"role": "user", "content": HOTEL}, now),
                                         Message(1, 0, "c1", "assistant", {"role": "assistant", "content": "Noted."}, now)])
            assert await feed.owed("local") == 1
            async with feed._connection() as connection:  # it died a minute ago
                await connection.execute("UPDATE asp_memory_pending SET touched = now() - interval '60 seconds'")
        finally:
            await store.close()

    asyncio.run(recorded_by_a_replica_that_died())
    b = replica(tmp_path, upstream, database, "b")
    try:
        wait_for("the orphaned turn indexed by B",
                 lambda: any("Alfama" in m["content"] for m in search(b, "offsite hotel", scope="user", user_id="alice")["data"]))
        # The memory is searchable a moment before the indexer counts it.
        counters = wait_for("B's counters", lambda: (c := httpx.get(f"{b.url}/admin/memory", timeout=30).json()["counters"])
                            .get("indexed", 0) >= 1 and c, timeout=10)
        assert counters.get("fleet_claimed", 0) == 1, counters

        async def owed() -> int:
            store = await PostgresStore.open(database, replicas="many")
            try:
                return await store.memory_feed().owed("local")
            finally:
                await store.close()

        wait_for("the debt settled", lambda: asyncio.run(owed()) == 0)
    finally:
        stop([b])


# -- one replica's sync in process, against writes made as another replica makes them --------

async def until(what: str, check: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


async def test_a_replica_whose_changes_were_pruned_before_it_read_them_reconciles(tmp_path: Path, upstream: FakeUpstream,
                                                                                 database: str) -> None:
    """Changes are pruned after a day; a replica stalled that long must not keep a stale index:
    it notices the gap in the tenant's numbering and compares its index with PostgreSQL."""
    import asyncpg

    from proxy import codec
    from proxy.config import load_config
    from proxy.errors import NotFound
    from proxy.memory.model import SEMANTIC, Memory
    from proxy.memory.service import MemoryService
    from proxy.storage.postgres import PostgresStore
    from proxy.storage.postgres_changes import FLEET_SETTING

    config = load_config(write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"episodic": False})}))
    store = await PostgresStore.open(database, replicas="many")
    other = await asyncpg.connect(database, server_settings={FLEET_SETTING: "on"})  # as another replica writes

    def row(memory_id: str, text: str) -> tuple[str, bytes, str, bytes, bytes]:
        memory = Memory(id=memory_id, type=SEMANTIC, text=text, ts=time.time(), key=7)  # its writer's key: never used here
        return ("local", b"", "memory", memory_id.encode(), codec.encode(memory.to_record()))

    insert = "INSERT INTO asp_records (tenant, sid, kind, key, record) VALUES ($1, $2, $3, $4, $5)"
    service = MemoryService(store, None, config.tenants.values(), tmp_path / "index")
    assert service.fleet is not None
    try:
        await service.start()
        state = service.tenants["local"]
        await asyncio.wait_for(state.ready.wait(), 30)
        ids = state.memory.ids
        await other.execute(insert, *row("mem_kept", "the kept one"))
        await other.execute(insert, *row("mem_doomed", "the doomed one"))
        await until("the notified changes applied", lambda: "mem_kept" in ids and "mem_doomed" in ids)

        async with other.transaction():  # changes this replica never gets to read
            await other.execute(insert, *row("mem_unseen", "the unseen one"))
            await other.execute("DELETE FROM asp_records WHERE key = $1", b"mem_doomed")
            await other.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the log written now, not at commit...
            await other.execute("DELETE FROM asp_memory_changes")  # ...and pruned before anyone read it
        await until("reconciled", lambda: state.counters["fleet_reconciled"] == 1)
        assert "mem_unseen" in ids and "mem_doomed" not in ids and "mem_kept" in ids
        assert state.memory.alive == 2
        assert (await service.get("local", "mem_unseen")).text == "the unseen one"
        with pytest.raises(NotFound):
            await service.get("local", "mem_doomed")
    finally:
        await service.close()
        await other.close()
        await store.close()


def test_two_replicas_backfill_each_session_once(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    """Sessions recorded while extraction was off; then two replicas start with it on: each
    session is extracted by one of them, each turn read by the extractor model once."""
    from proxy.memory import extract_llm

    storage = {"backend": "postgres", "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many"}}

    def configured(name: str, **memory: Any) -> ProxyProcess:
        directory = tmp_path / name
        tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "episodic": False} | memory)
        return ProxyProcess(write_config(directory, {"local": tenant}, storage=storage | {"data_dir": str(directory / "data")}),
                            env={"TEST_DATABASE_URL": database})

    asked: list[str] = []

    def extractor(body: dict[str, Any]) -> str | None:
        if body["messages"][0].get("content") != extract_llm.PROMPT:
            return None  # a chat turn: the echo
        turns = [line for line in body["messages"][1]["content"].splitlines() if " user: " in line]
        asked.extend(turns)
        return '{"memories": [%s]}' % ", ".join('{"kind": "fact", "text": "Stated: %s"}' % t.split(" user: ", 1)[1] for t in turns)

    upstream.responder = extractor
    sessions = [f"s{i:02d}" for i in range(12)]
    recorder = configured("recorder").start()
    try:
        sdk = openai.OpenAI(base_url=recorder.base_url, api_key="x", max_retries=0, timeout=60)
        for i, session in enumerate(sessions):
            sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"Fact number {i} is true."}],
                                        extra_headers={"X-User-ID": f"user{i}", "X-Session-ID": session})
    finally:
        stop([recorder])
    assert asked == []
    upstream.latency = 0.5  # each extractor call takes a while: the replicas' runs overlap
    replicas = [configured(name, extractor_model="fake-model", backfill_per_minute=6000) for name in ("a", "b")]
    try:
        starting = [threading.Thread(target=r.start) for r in replicas]  # at once: both find every session unextracted
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()

        def backfilled() -> list[dict[str, Any]] | None:
            progress = [httpx.get(f"{r.url}/admin/memory", timeout=30).json().get("backfill") for r in replicas]
            return progress if all(p and p["state"] == "done" for p in progress) else None

        progress = wait_for("both replicas' backfill done", backfilled)
        assert sorted(asked) == sorted(set(asked)) and len(asked) == len(sessions)  # each turn asked about once
        assert sum(p["done"] for p in progress) == len(sessions) and all(p["done"] for p in progress), progress
        for i, session in enumerate(sessions):
            view = httpx.get(f"{replicas[i % 2].url}/admin/memory/extractions", params={"session_id": session}, timeout=30).json()
            assert len(view["extraction_runs"]) == 1 and view["memories"][0]["content"] == f"Stated: Fact number {i} is true."
    finally:
        stop([r for r in replicas if r.process is not None])
