"""Start-up loading: stored memories back into the structures, orphans erased, then the index opened."""

from __future__ import annotations

import asyncio

from proxy.memory.indexer import Indexer
from proxy.memory.loader import Loader, decode_all
from proxy.memory.model import EPISODIC, KIND, VECTOR_KIND, Memory
from proxy.memory.ops import OpenIndex
from proxy.records import Session
from proxy.storage.base import Write
from proxy.storage.memory import InMemoryStore
from tests.memory.units import memory, tenant_state, unit_vectors


def _episodic(state, session: str, created: float, seq: int, text: str) -> Memory:
    m = memory(state, text, unit_vectors(1, seed=seq)[0])
    m.type, m.session, m.session_created, m.seq = EPISODIC, session, created, seq
    return m


def test_decode_all_keeps_the_valid_and_erases_orphans_and_rolled_back_ones() -> None:
    state = tenant_state()
    live = Session(tenant="t", id="s", created_at=1.0, last_active=1.0, extra={"rollbacks": [{"reverted": [2]}]})
    kept, rolled_back = _episodic(state, "s", 1.0, 1, "kept"), _episodic(state, "s", 1.0, 2, "rolled back")
    replaced, gone = _episodic(state, "s", 0.5, 3, "an older session of the same id"), _episodic(state, "x", 1.0, 1, "gone")
    rows = [(m.session, m.to_record(), m.vector_record()) for m in (kept, rolled_back, replaced, gone)]
    memories, writes = decode_all(rows + [("s", {"junk": True}, None)], {"s": live}, "local/test")
    assert [m.id for m in memories] == [kept.id] and memories[0].vector is not None
    erased = {(r.kind, r.key) for r in writes if r.value is None}
    assert erased == {(kind, m.id) for m in (rolled_back, replaced, gone) for kind in (KIND, VECTOR_KIND)}
    other_model, _ = decode_all(rows[:1], {"s": live}, "another/model")
    assert other_model[0].vector is None and other_model[0].model is None  # re-embedded later


async def test_load_fills_the_structures_marks_ready_and_queues_the_index_open() -> None:
    state = tenant_state()
    store = InMemoryStore()
    facts = [memory(state, f"fact {i}", unit_vectors(3)[i]) for i in range(3)]
    await store.apply([Write("t", records=[r for m in facts for r in m.records()])])
    fresh = tenant_state(ops=asyncio.Queue())
    await Loader(store, Indexer({"t": fresh}, store)).load(fresh)
    assert fresh.ready.is_set() and fresh.memory.alive == 3 and fresh.opening
    assert fresh.memory.next_key == max(m.key for m in facts) + 1  # keys are never handed out twice
    (op,) = [fresh.ops.get_nowait() for _ in range(fresh.ops.qsize())]
    assert op == OpenIndex("t", {})  # no index saved yet: the worker builds one from the copies
