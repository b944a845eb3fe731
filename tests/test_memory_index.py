"""The vector index: saved atomically, reloaded at start, rebuilt from LMDB when the file is
missing, corrupt or stale; searched through HNSW for large scopes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from proxy.memory import tenant as tenant_module
from proxy.memory.vectors import IndexFileError, VectorIndex
from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant, write_config
from tests.memory_helpers import SLOW_OK, chat, drain, injected_ids, memory_stats, running, wait_for_embedder

FACTS = [
    "The staging database runs PostgreSQL 16 on host pg-stage-3.",
    "Our on-call rotation changes every Tuesday at 10:00 CET.",
    "The mobile app release train ships every second Thursday.",
    "Invoices above 10k EUR need approval from Dana in finance.",
    "The design system lives in the repository called loom-ui.",
]


def _unit(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_saved_index_round_trips_and_corruption_is_detected(tmp_path: Path) -> None:
    index = VectorIndex(32)
    vectors = _unit(200)
    index.add(np.arange(200, dtype=np.uint64), vectors)
    path = tmp_path / "t.usearch"
    digest = index.save(path)
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file was renamed over
    loaded = VectorIndex.load(path, digest, 32, "f16")
    keys, sims = loaded.search(vectors[17], 1)
    assert int(keys[0]) == 17 and sims[0] > 0.99
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="does not match its manifest"):
        VectorIndex.load(path, digest, 32, "f16")
    path.write_bytes(bytes(raw[:100]))
    with pytest.raises(IndexFileError):
        VectorIndex.load(path, digest, 32, "f16")
    path.unlink()
    with pytest.raises(IndexFileError, match="cannot read"):
        VectorIndex.load(path, digest, 32, "f16")


def test_saving_never_holds_up_searches_and_searches_during_a_save_are_exact(tmp_path: Path) -> None:
    """The event loop searches the index while the writer thread saves it: a save must not
    take the searches' lock (it held them ~0.3 s at 100k), and searching meanwhile must give
    the answers it gives otherwise, and the file must load."""
    import threading

    index = VectorIndex(32, "i8")
    vectors = _unit(3000, seed=5)
    index.add(np.arange(3000, dtype=np.uint64), vectors)
    expected = [index.search(vectors[i], 5) for i in range(0, 3000, 97)]
    with index.lock:  # a search in progress: the save must still go through
        saver = threading.Thread(target=index.save, args=(tmp_path / "held.usearch",))
        saver.start()
        saver.join(timeout=10)
        assert not saver.is_alive()
    digests: list[str] = []
    saving = threading.Thread(target=lambda: [digests.append(index.save(tmp_path / f"s{i}.usearch")) for i in range(15)])
    saving.start()
    rounds = 0
    while saving.is_alive() or rounds == 0:
        for found, i in zip(expected, range(0, 3000, 97)):
            keys, sims = index.search(vectors[i], 5)
            assert keys.tolist() == found[0].tolist() and np.allclose(sims, found[1])
        rounds += 1
    saving.join()
    loaded = VectorIndex.load(tmp_path / "s14.usearch", digests[-1], 32, "i8")
    assert len(loaded) == 3000 and int(loaded.search(vectors[42], 1)[0][0]) == 42


def test_removed_keys_are_never_found_and_adding_twice_is_harmless() -> None:
    index = VectorIndex(32)
    vectors = _unit(50, seed=1)
    index.add(np.arange(50, dtype=np.uint64), vectors)
    index.add(np.array([3], dtype=np.uint64), vectors[3:4])
    index.remove([3, 4])
    keys, _ = index.search(vectors[3], 10)
    assert 3 not in set(keys.tolist()) and 4 not in set(keys.tolist())
    assert len(index) == 48


def _start(config_path: Path):
    return running(config_path)


def _memory(proxy: ProxyThread):
    assert proxy.app is not None
    return proxy.app[keys.PIPELINE].memory


def _hnsw_keys(proxy: ProxyThread, tenant: str = "local") -> set[int]:
    mem = _memory(proxy).tenants[tenant].memory
    assert mem.vectors is not None and mem.hnsw_ready
    return {int(k) for k in mem.vectors.keys()}


def _alive_keys(proxy: ProxyThread, tenant: str = "local") -> set[int]:
    mem = _memory(proxy).tenants[tenant].memory
    return {int(mem.cols.ukey[slot]) for slot in mem.key_slot.values()}


def _add_facts(proxy: ProxyThread, facts: list[str]) -> list[str]:
    ids = []
    for fact in facts:
        response = httpx.post(f"{proxy.url}/v1/memories", json={"content": fact, "user_id": "ops"})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def _search_top(proxy: ProxyThread, query: str) -> str:
    found = httpx.post(f"{proxy.url}/v1/memories/search", json={"query": query, "user_id": "ops", "top_k": 1}).json()
    return found["data"][0]["content"] if found["data"] else ""


@pytest.fixture
def config_path(tmp_path: Path, upstream: FakeUpstream) -> Path:
    return write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK})})


@pytest.fixture
def through_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Search large-scope style (HNSW) even with a handful of memories."""
    monkeypatch.setattr(tenant_module, "EXACT_MAX", 0)


def test_index_is_saved_at_shutdown_and_loaded_at_start(config_path: Path, through_hnsw: None) -> None:
    with _start(config_path) as proxy:
        _add_facts(proxy, FACTS)
        chat(proxy, "Remind me: the staging database host is pg-stage-3", user="ops", session="s1")
        drain(proxy)
        before = _alive_keys(proxy)
    index_file = config_path.parent / "data" / "index" / "local.usearch"
    assert index_file.is_file()
    with _start(config_path) as proxy:
        drain(proxy)
        assert _hnsw_keys(proxy) == _alive_keys(proxy) == before
        counters = memory_stats(proxy)["counters"]
        assert counters.get("index_rebuilds", 0) == 0 and counters.get("index_reconciled", 0) == 0
        assert _search_top(proxy, "Who approves large invoices?") == FACTS[3]
        _, headers = chat(proxy, "which host runs the staging database?", user="ops", session="s2")
        assert injected_ids(headers)


def test_index_files_are_written_and_read_on_a_thread_that_is_never_starved(config_path: Path, through_hnsw: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """usearch holds the GIL for a whole save or load: on a SCHED_IDLE thread (where indexing
    runs), a preemption in the middle would stall the event loop until a core fell idle."""
    import os
    import threading

    from proxy.memory.vectors import VectorIndex

    seen: dict[str, tuple[int, int]] = {}

    def thread_state() -> tuple[int, int]:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)

    save, load = VectorIndex.save, VectorIndex.load.__func__

    def recording_save(self, *args, **kwargs):
        seen["save"] = thread_state()
        return save(self, *args, **kwargs)

    def recording_load(cls, *args, **kwargs):
        seen["load"] = thread_state()
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "save", recording_save)
    monkeypatch.setattr(VectorIndex, "load", classmethod(recording_load))
    with _start(config_path) as proxy:
        _add_facts(proxy, FACTS)
        drain(proxy)
    with _start(config_path) as proxy:
        drain(proxy)
        assert _hnsw_keys(proxy) == _alive_keys(proxy)
    assert seen == {"save": (19, os.SCHED_OTHER), "load": (19, os.SCHED_OTHER)}


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_index_is_rebuilt_from_lmdb_when_the_file_is_missing_or_corrupt(config_path: Path, through_hnsw: None, damage: str) -> None:
    with _start(config_path) as proxy:
        _add_facts(proxy, FACTS)
        drain(proxy)
        before = _alive_keys(proxy)
    index_file = config_path.parent / "data" / "index" / "local.usearch"
    if damage == "delete":
        index_file.unlink()
    elif damage == "corrupt":
        raw = bytearray(index_file.read_bytes())
        for i in range(64, len(raw), 97):
            raw[i] ^= 0x5A
        index_file.write_bytes(bytes(raw))
    else:
        index_file.write_bytes(index_file.read_bytes()[:300])
    with _start(config_path) as proxy:
        drain(proxy)
        assert _hnsw_keys(proxy) == before
        assert memory_stats(proxy)["counters"]["index_rebuilds"] == 1
        assert _search_top(proxy, "When does the on-call rotation change?") == FACTS[1]
    assert index_file.stat().st_size > 300  # saved again, whole


def test_an_index_saved_with_another_dtype_is_rebuilt_once_in_the_current_one(config_path: Path, through_hnsw: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index file from a release that saved f16 is refused by the i8 release (never misread),
    # rebuilt from LMDB once, and saved again as i8.
    from proxy.memory import index_worker as service_module

    monkeypatch.setattr(service_module, "INDEX_DTYPE", "f16")
    with _start(config_path) as proxy:
        _add_facts(proxy, FACTS)
        drain(proxy)
        before = _alive_keys(proxy)
        assert memory_stats(proxy)["index"]["dtype"] == "f16"
    assert _manifest(config_path)["dtype"] == "f16"
    monkeypatch.setattr(service_module, "INDEX_DTYPE", "i8")
    with _start(config_path) as proxy:
        drain(proxy)
        assert _hnsw_keys(proxy) == before
        assert memory_stats(proxy)["counters"]["index_rebuilds"] == 1
        assert _search_top(proxy, "When does the on-call rotation change?") == FACTS[1]
    assert _manifest(config_path)["dtype"] == "i8"
    with _start(config_path) as proxy:  # and from then on it loads
        drain(proxy)
        assert memory_stats(proxy)["counters"].get("index_rebuilds", 0) == 0
        assert _search_top(proxy, "Who approves large invoices?") == FACTS[3]


def _manifest(config_path: Path, value: dict | None = None) -> dict | None:
    """Read (or overwrite) the index manifest in LMDB while the proxy is stopped."""
    from proxy.storage.base import Record
    from proxy.storage.lmdb_store import LmdbStore

    async def run() -> dict | None:
        store = LmdbStore.open(str(config_path.parent / "data" / "lmdb"))
        try:
            if value is not None:
                await store.put_records("local", [Record("memory_index", "manifest", value)])
            return await store.get_record("local", "memory_index", "manifest")
        finally:
            await store.close()

    return asyncio.run(run())


def test_a_stale_index_is_reconciled_with_lmdb(config_path: Path, through_hnsw: None) -> None:
    with _start(config_path) as proxy:
        ids = _add_facts(proxy, FACTS[:3])
        drain(proxy)
    index_file = config_path.parent / "data" / "index" / "local.usearch"
    old_file, old_manifest = index_file.read_bytes(), _manifest(config_path)
    with _start(config_path) as proxy:
        drain(proxy)
        httpx.delete(f"{proxy.url}/v1/memories/{ids[0]}")
        _add_facts(proxy, FACTS[3:])
        drain(proxy)
        current = _alive_keys(proxy)
    # Put back the older index and its manifest: intact, but it misses two memories and still
    # holds a deleted one (a crash between two saves leaves this).
    index_file.write_bytes(old_file)
    assert old_manifest is not None
    _manifest(config_path, old_manifest | {"next_key": 0})
    with _start(config_path) as proxy:
        drain(proxy)
        assert _hnsw_keys(proxy) == current
        stats = memory_stats(proxy)
        assert stats["counters"]["index_reconciled"] == 3 and stats["counters"].get("index_rebuilds", 0) == 0
        assert _search_top(proxy, "Where is the design system?") == FACTS[4]
        found = httpx.post(f"{proxy.url}/v1/memories/search", json={"query": FACTS[0], "user_id": "ops"}).json()
        assert ids[0] not in [m["id"] for m in found["data"]]
        # Keys are never reused, even with an old manifest: new memories get fresh ones.
        new = _add_facts(proxy, ["The VPN gateway is vpn-2.example.net."])
        drain(proxy)
        assert len(_hnsw_keys(proxy)) == len(current) + 1 and new


def _rewrite_records(config_path: Path, change) -> dict[tuple[str | None, str], dict[str, dict]]:
    """Apply ``change(records) -> writes`` to the stopped proxy's memory records, where
    ``records`` maps (session, kind) to {key: value} for the tenant-wide scope and session s1;
    returns the records as they were."""
    from proxy.storage.base import Write
    from proxy.storage.lmdb_store import LmdbStore

    async def run() -> dict:
        store = LmdbStore.open(str(config_path.parent / "data" / "lmdb"))
        try:
            found = {(sid, kind): dict(await store.scan_records("local", kind, sid))
                     for sid in (None, "s1") for kind in ("memory", "memory_vector")}
            writes = change(found)
            if writes:
                await store.apply([Write("local", records=writes)])
            return found
        finally:
            await store.close()

    return asyncio.run(run())


def test_memory_records_of_before_keep_their_vectors_and_are_split_at_load(config_path: Path, through_hnsw: None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before vectors had records of their own (each memory record held its
    vector) loads with its vectors, so nothing is embedded again, and is rewritten in the
    current layout: recalls then read records a quarter of the size."""
    from proxy.memory import loader as service_module
    from proxy.storage.base import Record

    with _start(config_path) as proxy:
        wait_for_embedder(proxy)  # so that every memory is stored with its vector
        _add_facts(proxy, FACTS)
        chat(proxy, "Remind me: the staging database host is pg-stage-3", user="ops", session="s1")
        drain(proxy)
        before = _alive_keys(proxy)

    def to_old_layout(found: dict) -> list[Record]:
        writes = []
        for sid in (None, "s1"):
            assert found[(sid, "memory")] and found[(sid, "memory")].keys() == found[(sid, "memory_vector")].keys()
            for key, value in found[(sid, "memory")].items():
                writes.append(Record("memory", key, value | found[(sid, "memory_vector")][key], sid))
                writes.append(Record("memory_vector", key, None, sid))
        return writes

    split = _rewrite_records(config_path, to_old_layout)
    old = _rewrite_records(config_path, lambda found: [])
    assert all("vec16" in value for sid in (None, "s1") for value in old[(sid, "memory")].values())
    assert not old[(None, "memory_vector")] and not old[("s1", "memory_vector")]
    (config_path.parent / "data" / "index" / "local.usearch").unlink()  # rebuilt from the vectors LMDB holds

    decoded = []
    decode = service_module.decode_all

    def counting_decode(rows, sessions, model):
        memories, writes = decode(rows, sessions, model)
        decoded.extend(m.vector is not None for m in memories)
        return memories, writes

    monkeypatch.setattr(service_module, "decode_all", counting_decode)
    with _start(config_path) as proxy:
        drain(proxy)
        assert len(decoded) == len(before) and all(decoded)  # every vector came from LMDB
        assert _hnsw_keys(proxy) == before and memory_stats(proxy)["counters"]["index_rebuilds"] == 1
        assert _search_top(proxy, "Who approves large invoices?") == FACTS[3]
        _, headers = chat(proxy, "which host runs the staging database?", user="ops", session="s2")
        assert injected_ids(headers)
    assert _rewrite_records(config_path, lambda found: []) == split  # the current layout, values unchanged


def test_an_i8_index_round_trips_and_an_index_of_another_dtype_is_not_misread(tmp_path: Path) -> None:
    index = VectorIndex(32, "i8")
    vectors = _unit(200, seed=2)
    index.add(np.arange(200, dtype=np.uint64), vectors)
    path = tmp_path / "t.usearch"
    digest = index.save(path)
    loaded = VectorIndex.load(path, digest, 32, "i8")
    keys, sims = loaded.search(vectors[42], 3)
    assert int(keys[0]) == 42 and abs(sims[0] - 1.0) < 0.01
    assert np.allclose(loaded.vectors(np.array([42, 999])), [vectors[42], np.zeros(32)], atol=0.02)
    assert loaded.contains(np.array([0, 199, 200])).tolist() == [True, True, False]
    with pytest.raises(IndexFileError, match="expected f16"):
        VectorIndex.load(path, digest, 32, "f16")


def test_stored_vectors_are_half_precision_in_a_record_of_their_own() -> None:
    """A memory is stored as its record (text and metadata: what a recall reads back) and a
    vector record in float16, which must read back within float16 rounding (the indexes keep 8
    bits a component) and stay under LMDB's ~2 KB node limit (no overflow page of its own).
    Records of before, which held the vector themselves (float16 "vec16", or float32 "vec"),
    must still read."""
    import base64

    import orjson

    from proxy.memory.model import EPISODIC, KIND, VECTOR_KIND, Memory

    vector = _unit(1, 384, seed=7)[0]
    memory = Memory(id="mem_0123456789abcdef0123", type=EPISODIC, text="I moved to Lisbon in March; the flat is near Alfama. " * 3,
                    ts=1764000000.123, key=123456, user="alice", session="s-42", session_created=1764000000.0, seq=1200,
                    role="user", context="Where do you live these days? " * 4, model="all-MiniLM-L6-v2-int8", vector=vector)
    text_record, vector_record = memory.records()
    assert (text_record.kind, vector_record.kind) == (KIND, VECTOR_KIND)
    assert text_record.key == vector_record.key == memory.id and text_record.session_id == vector_record.session_id == "s-42"
    assert not {"vec", "vec16"} & set(text_record.value) and len(orjson.dumps(text_record.value)) < 600
    assert len(orjson.dumps(vector_record.value)) < 1900
    back = Memory.from_record(text_record.value, vector_value=vector_record.value)
    assert back.vector is not None and back.vector.dtype == np.float32 and back.embedded and back.model == memory.model
    assert np.abs(back.vector - vector).max() < 1e-3 and float(back.vector @ vector) > 0.9999
    assert not np.array_equal(back.vector, vector)  # really rounded: the test is not comparing a vector with itself
    alone = Memory.from_record(text_record.value)  # what a recall reads: embedded, no vector decoded
    assert alone.vector is None and alone.embedded and alone.text == memory.text and alone.context == memory.context

    inline = text_record.value | vector_record.value  # a record of before
    assert np.array_equal(Memory.from_record(inline).vector, back.vector)
    legacy = {k: v for k, v in inline.items() if k != "vec16"} | {"vec": base64.b64encode(vector.astype("<f4").tobytes()).decode()}
    assert np.array_equal(Memory.from_record(legacy).vector, vector) and Memory.from_record(legacy).embedded
    unembedded = Memory(**{**memory.__dict__, "vector": None, "model": None})
    assert [r.kind for r in unembedded.records()] == [KIND] and not Memory.from_record(unembedded.to_record()).embedded
    assert Memory.from_record(inline, with_vector=False).vector is None and Memory.from_record(inline, with_vector=False).embedded


def test_periodic_saves_wait_for_a_moment_without_requests(config_path: Path, through_hnsw: None) -> None:
    """usearch holds the GIL while it writes the index, which stalls every request: a
    periodic save waits until no request has been in flight for a while (or too long)."""
    from proxy.priority import activity

    index_file = config_path.parent / "data" / "index" / "local.usearch"
    with _start(config_path) as proxy:
        service = _memory(proxy)
        _add_facts(proxy, FACTS)
        drain(proxy)
        assert not index_file.exists() and service.tenants["local"].dirty

        async def save_during_a_request() -> tuple[bool, bool]:
            activity.started()  # a request in flight
            try:
                saving = asyncio.ensure_future(service.save_when_quiet(within=30))
                await asyncio.sleep(0.8)
                held = not saving.done()
            finally:
                activity.ended()
            await asyncio.wait_for(saving, 5)
            await service.ops.join()
            return held, index_file.exists()

        held, saved = proxy.call(save_during_a_request())
        assert held and saved  # not while the request was in flight; soon after it ended
        assert not service.tenants["local"].dirty
        _add_facts(proxy, ["The build cache lives on host cache-2."])
        drain(proxy)
        before = index_file.stat().st_mtime_ns

        async def never_quiet() -> bool:
            activity.started()
            try:
                await service.save_when_quiet(within=0.3)  # waited long enough: saves regardless
                await service.ops.join()
            finally:
                activity.ended()
            return index_file.stat().st_mtime_ns != before

        assert proxy.call(never_quiet())
