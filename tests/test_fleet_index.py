"""A fleet replica saves its usearch index in its own index_dir with its key map and change-log
cursor (proxy/memory/fleet_index.py), and at the next start reuses it: only the memories
changed meanwhile get fresh keys. A pruned change log, a damaged file, another embedding model
or a vector that does not match PostgreSQL rebuild it instead. Two replicas in one process,
each with its own index_dir, on one real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from proxy.config import load_config
from proxy.memory import tenant as tenant_module
from proxy.memory.extract_rules import Candidate
from proxy.memory.fleet_index import ReplicaFiles, SavedIndex, SavedIndexError
from proxy.memory.model import SEMANTIC, Scope
from proxy.memory.service import MemoryService
from proxy.records import Message, Session
from proxy.storage.base import Write
from proxy.storage.postgres import PostgresStore
from tests.fake_upstream import FakeUpstream
from tests.harness import open_tenant, write_config

FACTS = [
    "The staging database runs PostgreSQL 16 on host pg-stage-3.",
    "Our on-call rotation changes every Tuesday at 10:00 CET.",
    "The mobile app release train ships every second Thursday.",
    "Invoices above 10k EUR need approval from Dana in finance.",
    "The design system lives in the repository called loom-ui.",
]
ADDED = "The office parrot is called Captain Flint and speaks Portuguese."
MOVED = "Quarterly planning happens in the Zurich office by the lake."  # FACTS[2]'s new vector


@pytest.fixture
def database(postgres_server) -> str:
    return asyncio.run(postgres_server.new_database())


@pytest.fixture
def through_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Search every scope through the HNSW index (small scopes are otherwise scored exactly)."""
    monkeypatch.setattr(tenant_module, "EXACT_MAX", 0)


async def until(what: str, check: Callable[[], Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


class Replica:
    """One replica's memory service on its own store connection and index_dir."""

    def __init__(self, config: Any, database: str, index_dir: Path) -> None:
        self.config, self.database, self.index_dir = config, database, index_dir

    async def __aenter__(self) -> Replica:
        self.store = await PostgresStore.open(self.database, replicas="many")
        self.service = MemoryService(self.store, None, self.config.tenants.values(), self.index_dir)
        await self.service.start()
        self.state = self.service.tenants["local"]
        await asyncio.wait_for(self.state.ready.wait(), 60)
        await asyncio.wait_for(self.state.embedder.ready.wait(), 60)
        await until("the index ready", lambda: self.state.memory.hnsw_ready)
        await self.service.ops.join()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.service.close()
        await self.store.close()

    @property
    def mem(self) -> Any:
        return self.state.memory

    async def caught_up(self) -> None:
        """Every committed change applied and every index op done."""
        head = await self.store.memory_feed().head("local")
        await until("the change log applied", lambda: self.service.fleet.cursors.get("local") == head)
        await self.service.ops.join()

    def key(self, memory_id: str) -> int:
        return int(self.mem.cols.ukey[self.mem.ids.slot(memory_id)])

    def nearest(self, vector: np.ndarray) -> str | None:
        """The memory the HNSW index finds nearest to ``vector``."""
        keys, _ = self.mem.vectors.search(vector, 1)
        slots = self.mem.key_slot.lookup(keys)
        return self.mem.ids[int(slots[0])] if len(slots) and slots[0] >= 0 else None

    def indexed_ids(self) -> set[str]:
        """The memories whose keys the HNSW index holds (a key of no live memory: None)."""
        return {self.mem.ids[int(s)] if s >= 0 else None for s in self.mem.key_slot.lookup(self.mem.vectors.keys())}

    async def embed(self, text: str) -> np.ndarray:
        return np.asarray(await self.state.embedder.index.embed(text), dtype=np.float32)


def configured(tmp_path: Path, upstream: FakeUpstream) -> Any:
    return load_config(write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"episodic": False})}))


async def supersede(replica: Replica, text: str) -> None:
    """What extraction does when a newer statement replaces an older one (proxy/memory/supersede.py)."""
    session = await replica.store.get_session("local", "facts")
    candidate = Candidate(text, SEMANTIC, "fact", subject="user.email")
    await replica.service.learning.extractor.consolidator.apply("local", "alice", "facts", session.created_at, "rules", [candidate])


async def saved_fleet(tmp_path: Path, config: Any, database: str) -> dict[str, Any]:
    """Replicas A and B; B adds the facts and a superseded fact's first version; A follows,
    then stops and saves its index. Returns the memory ids and A's keys."""
    async with Replica(config, database, tmp_path / "b") as b:
        now = time.time()
        await b.store.commit(Session("local", "facts", now, now, user_id="alice", head=0, next_seq=1, turns=1),
                             [Message(0, None, "c0", "user", {"role": "user", "content": "My email is alice@old.example."}, now)])
        async with Replica(config, database, tmp_path / "a") as a:
            ids = [(await b.service.add("local", fact)).id for fact in FACTS]
            await supersede(b, "My email is alice@old.example.")
            await a.caught_up()
            assert set(ids) <= a.indexed_ids() and len(a.indexed_ids()) == 6
            keys = {memory_id: a.key(memory_id) for memory_id in ids}
            old_email = a.mem.session_memories("facts")[0]
        assert a.state.counters["index_saved"] >= 1
        assert ReplicaFiles(tmp_path / "a").read("local").cursor == a.service.fleet.cursors["local"]
    return {"ids": ids, "keys": keys, "old_email": old_email}


async def test_a_restarted_replica_reuses_its_saved_index_and_applies_only_what_changed_while_it_was_down(
        tmp_path: Path, upstream: FakeUpstream, database: str, through_hnsw: None) -> None:
    config = configured(tmp_path, upstream)
    saved = await saved_fleet(tmp_path, config, database)
    ids, keys = saved["ids"], saved["keys"]
    async with Replica(config, database, tmp_path / "b") as b:  # while A is down, through B:
        added = (await b.service.add("local", ADDED)).id
        await b.service.delete("local", ids[1])
        await supersede(b, "My email is alice@new.example.")
        moved = await b.service.get("local", ids[2])  # the same memory, stored again with another vector
        moved.vector, moved.model = await b.embed(MOVED), b.state.model_name
        await b.store.apply([Write("local", records=moved.records())])
        added_vector, moved_vector = await b.embed(ADDED), moved.vector

    async with Replica(config, database, tmp_path / "a") as a:
        counters = a.state.counters
        assert counters["index_loaded"] == 1 and counters["index_rebuilds"] == 0, counters
        new_email = next(i for i in a.mem.session_memories("facts") if i != saved["old_email"])
        # The saved keys were kept for the memories nobody changed; the changed one got a fresh key.
        assert [a.key(i) for i in (ids[0], ids[3], ids[4])] == [keys[i] for i in (ids[0], ids[3], ids[4])]
        assert a.key(ids[2]) != keys[ids[2]] and a.key(ids[2]) > max(keys.values())
        # The HNSW index holds exactly the live memories: the deleted and the superseded are gone.
        assert a.indexed_ids() == {ids[0], ids[2], ids[3], ids[4], added, new_email}
        assert ids[1] not in a.mem.ids and saved["old_email"] not in a.mem.ids
        assert a.nearest(added_vector) == added and a.nearest(moved_vector) == ids[2]
        held = a.mem.vectors.vectors(np.array([a.key(ids[2])], dtype=np.uint64))[0]
        assert float(held @ moved_vector) > 0.98  # its new vector, not the one saved

        async def found(query: str) -> list[str]:
            hits, degraded = await a.service.search("local", query, Scope("tenant", None, None), top_k=3, types=[SEMANTIC], min_score=0.3)
            assert degraded is None
            return [memory.id for memory, _ in hits]

        assert (await found("What is the office parrot called?"))[0] == added
        assert ids[1] not in await found("When does the on-call rotation change?")
        assert (await found("What is my email address?"))[:1] == [new_email]
        assert saved["old_email"] not in await found("What is my email address?")
        assert (await found("Where does quarterly planning happen?"))[0] == ids[2]


async def test_a_change_log_pruned_past_the_saved_cursor_rebuilds_the_index(tmp_path: Path, upstream: FakeUpstream, database: str,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = configured(tmp_path, upstream)
    saved = await saved_fleet(tmp_path, config, database)
    async with Replica(config, database, tmp_path / "b") as b:
        added = (await b.service.add("local", ADDED)).id
        await b.service.delete("local", saved["ids"][1])
        added_vector = await b.embed(ADDED)
        async with b.store.memory_feed()._connection() as connection:
            await connection.execute("DELETE FROM asp_memory_changes")  # a replica down longer than the retention
    caplog.set_level(logging.WARNING, "agent_state_proxy.memory")
    async with Replica(config, database, tmp_path / "a") as a:
        assert a.state.counters["index_rebuilds"] == 1 and a.state.counters["index_loaded"] == 0
        assert "no longer holds every change" in caplog.text
        assert a.indexed_ids() == set(saved["ids"]) - {saved["ids"][1]} | {added, *a.mem.session_memories("facts")}
        assert a.nearest(added_vector) == added


@pytest.mark.parametrize("damaged", ["index", "manifest"])
async def test_a_damaged_saved_file_rebuilds_the_index_with_a_warning(tmp_path: Path, upstream: FakeUpstream, database: str,
                                                                      caplog: pytest.LogCaptureFixture, damaged: str) -> None:
    config = configured(tmp_path, upstream)
    saved = await saved_fleet(tmp_path, config, database)
    files = ReplicaFiles(tmp_path / "a")
    path = files.index_path("local") if damaged == "index" else files.manifest_path("local")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    path.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, "agent_state_proxy.memory")
    async with Replica(config, database, tmp_path / "a") as a:
        assert a.state.counters["index_rebuilds"] == 1 and a.state.counters["index_loaded"] == 0
        assert "unusable" in caplog.text and "rebuilding" in caplog.text
        assert set(saved["ids"]) <= a.indexed_ids() and None not in a.indexed_ids()
        assert a.nearest(await a.embed(FACTS[3])) == saved["ids"][3]


async def test_an_index_saved_with_another_embedding_model_is_rebuilt(tmp_path: Path, upstream: FakeUpstream, database: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    config = configured(tmp_path, upstream)
    saved = await saved_fleet(tmp_path, config, database)
    files = ReplicaFiles(tmp_path / "a")
    before = files.read("local")
    files.write("local", SavedIndex(before.digest, "another-model", before.dim, before.dtype, before.cursor, before.next_key, before.keys))
    caplog.set_level(logging.WARNING, "agent_state_proxy.memory")
    async with Replica(config, database, tmp_path / "a") as a:
        assert a.state.counters["index_rebuilds"] == 1 and a.state.counters["index_loaded"] == 0
        assert "holds vectors of another-model" in caplog.text
        assert set(saved["ids"]) <= a.indexed_ids()


async def test_a_vector_changed_without_a_logged_change_is_caught_and_rebuilt(tmp_path: Path, upstream: FakeUpstream, database: str,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth: the keys reused from the manifest are checked against the vectors
    loaded from PostgreSQL; one that differs (a write the change log did not see) rebuilds."""
    import asyncpg

    from proxy import codec

    config = configured(tmp_path, upstream)
    saved = await saved_fleet(tmp_path, config, database)
    async with Replica(config, database, tmp_path / "b") as b:
        moved = await b.service.get("local", saved["ids"][2])
        moved.vector, moved.model = await b.embed(MOVED), b.state.model_name
        moved_vector = moved.vector
    unlogged = await asyncpg.connect(database)  # not a fleet connection: its writes are not logged
    try:
        await unlogged.execute("UPDATE asp_records SET record = $1 WHERE tenant = 'local' AND kind = 'memory_vector' AND key = $2",
                               codec.encode(moved.vector_record()), saved["ids"][2].encode())
    finally:
        await unlogged.close()
    caplog.set_level(logging.WARNING, "agent_state_proxy.memory")
    async with Replica(config, database, tmp_path / "a") as a:
        assert a.state.counters["index_rebuilds"] == 1 and a.state.counters["index_loaded"] == 0
        assert "other vectors than PostgreSQL" in caplog.text
        assert a.nearest(moved_vector) == saved["ids"][2]


async def test_a_second_replica_on_the_same_index_dir_neither_loads_nor_saves_there(tmp_path: Path, upstream: FakeUpstream, database: str,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    config = configured(tmp_path, upstream)
    caplog.set_level(logging.WARNING, "agent_state_proxy.memory")
    async with Replica(config, database, tmp_path / "shared") as first:
        assert first.service.worker.files is not None and first.service.fleet.files is not None
        second = MemoryService(first.store, None, config.tenants.values(), tmp_path / "shared")
        try:
            assert not second.worker.saves and second.worker.files is None and second.fleet.files is None
            assert "is used by another process" in caplog.text
        finally:
            await second.close()
    after = ReplicaFiles(tmp_path / "shared")
    assert after.claim()  # the first one released it when it stopped
    after.release()


def test_an_index_dir_is_claimed_by_one_process_at_a_time(tmp_path: Path) -> None:
    first, second = ReplicaFiles(tmp_path / "index"), ReplicaFiles(tmp_path / "index")
    assert first.claim()
    assert not second.claim()  # a second replica configured with the same data_dir
    first.release()
    assert second.claim()
    second.release()


def test_a_manifest_round_trips_and_any_damage_is_refused(tmp_path: Path) -> None:
    files = ReplicaFiles(tmp_path)
    saved = SavedIndex("ab" * 20, "local-minilm", 384, "i8", 41, 9, {"mem_a": 3, "mem_b": 8})
    files.write("t", saved)
    assert files.read("t") == saved and files.read("other") is None
    assert not list(tmp_path.glob("*.tmp-*"))
    raw = files.manifest_path("t").read_bytes()
    rng = np.random.default_rng(3)
    for cut in rng.integers(0, len(raw), 40).tolist():
        damaged = bytearray(raw)
        damaged[cut] ^= 1 << int(rng.integers(0, 8))
        files.manifest_path("t").write_bytes(bytes(damaged))
        with pytest.raises(SavedIndexError):
            files.read("t")
        files.manifest_path("t").write_bytes(raw[:cut])
        with pytest.raises(SavedIndexError):
            files.read("t")
    for keys in ({"mem_a": 3, "mem_b": 3}, {"mem_a": 9}, {"mem_a": -1}):  # a key twice, or outside the labels handed out
        files.write("t", SavedIndex("ab" * 20, "m", 384, "i8", 41, 9, keys))
        with pytest.raises(SavedIndexError, match="inconsistent key map"):
            files.read("t")
