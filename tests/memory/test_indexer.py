"""The indexer: recorded messages become episodic memories, stored with the session's mark and
made searchable; nothing is kept for a session erased meanwhile."""

from __future__ import annotations

import contextlib

import numpy as np

from proxy.jobs import Claims
from proxy.memory.indexer import MARK_KEY, MARK_KIND, Indexer, episodic
from proxy.memory.model import KIND
from proxy.records import Message, Session
from proxy.storage.memory import InMemoryStore
from tests.memory.units import DIM, tenant_state, unit_vectors


def _messages(*texts: tuple[str, str]) -> list[Message]:
    return [Message(seq=i, parent=i - 1 if i else None, chain=f"c{i}", role=role, body={"role": role, "content": text}, ts=float(i))
            for i, (role, text) in enumerate(texts)]


async def _setup(*texts: tuple[str, str]):
    state = tenant_state()
    state.ready.set()
    store = InMemoryStore()
    messages = _messages(*texts)
    session = Session(tenant="t", id="s", created_at=1.0, last_active=1.0, user_id="u", head=messages[-1].seq, next_seq=len(messages))
    await store.commit(session, messages)
    return state, store, Indexer({"t": state}, store), session, messages


async def _index_queued(indexer: Indexer, state) -> None:
    jobs = []
    while not indexer.jobs.empty():
        jobs.append(indexer.jobs.get_nowait())
    await indexer.index(state, jobs)


async def test_recorded_messages_are_stored_with_the_mark_and_become_searchable() -> None:
    state, store, indexer, session, messages = await _setup(("user", "Book the hotel in Lisbon for May"),
                                                            ("assistant", "Done: the Alfama hotel, May 3 to 7."))
    state.embedder.error = "down"  # no embedder: stored lexically, re-embedded later
    await indexer.queue_messages(state, session, "u", messages, None)
    assert indexer.jobs.qsize() == 3  # two memories and the mark
    await _index_queued(indexer, state)
    assert state.memory.alive == 2 and state.counters["indexed"] == 2 and len(state.memory.unembedded) == 2
    assert await store.get_record("t", MARK_KIND, MARK_KEY, "s") == {"next": 2, "created": 1.0}
    stored = await store.scan_records("t", KIND, "s")
    assert len(stored) == 2 and {v["text"] for _, v in stored} == {m.body["content"] for m in messages}
    hits = state.memory.search("Lisbon hotel", None, state.scope_for("u", "s"), top_k=2, min_score=0.5)
    assert hits and hits[0].id == episodic("t", "s", 1.0, "u", messages[0]).id


async def test_a_session_erased_before_indexing_keeps_nothing() -> None:
    state, store, indexer, session, messages = await _setup(("user", "My locker code is 4512"))
    state.embedder.error = "down"
    await indexer.queue_messages(state, session, "u", messages, None)
    assert await store.delete_session("t", "s")
    await _index_queued(indexer, state)
    assert state.memory.alive == 0 and await store.scan_records("t", KIND, "s") == []
    assert await store.get_record("t", MARK_KIND, MARK_KEY, "s") is None


def test_an_episodic_memory_carries_the_end_of_the_message_it_answers() -> None:
    question, answer = _messages(("user", "x" * 600 + " where is the meeting?"), ("assistant", "In room 4."))
    memory = episodic("t", "s", 1.0, "u", answer, question)
    assert memory is not None and memory.text == "In room 4." and memory.context.startswith("…") and memory.context.endswith("meeting?")
    assert len(memory.context) == 501 and memory.seq == 1 and memory.session == "s" and memory.user == "u"
    errored = Message(seq=2, parent=1, chain="c2", role="assistant", body={"role": "assistant", "content": "oops"}, ts=2.0, outcome="error")
    system = Message(seq=3, parent=None, chain="c3", role="system", body={"role": "system", "content": "be nice"}, ts=3.0)
    assert episodic("t", "s", 1.0, "u", errored) is None and episodic("t", "s", 1.0, "u", system) is None


class _CountingEmbedder:
    dim = DIM

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return unit_vectors(len(texts), seed=len(self.texts))


@contextlib.asynccontextmanager
async def _claimed_elsewhere(job: str):
    yield False  # another replica holds the job


@contextlib.asynccontextmanager
async def _granted(job: str):
    yield True


async def test_in_a_fleet_one_replica_reembeds_a_memory_stored_without_a_vector() -> None:
    state, store, indexer, session, messages = await _setup(("user", "Book the hotel in Lisbon for May"))
    state.embedder.error = "down"
    await indexer.queue_messages(state, session, "u", messages, None)
    await _index_queued(indexer, state)
    assert len(state.memory.unembedded) == 1
    embedder = _CountingEmbedder()
    state.embedder.set(embedder)  # the embedder is back
    try:
        # Another replica is re-embedding this tenant's memories: this one leaves them to it
        # (their vectors arrive through the fleet's change feed) and asks again next round.
        other = Indexer({"t": state}, store, Claims(_claimed_elsewhere))
        other.queue_reembedding(state)
        await _index_queued(other, state)
        assert embedder.texts == [] and len(state.memory.unembedded) == 1
        granted = Indexer({"t": state}, store, Claims(_granted))
        granted.queue_reembedding(state)
        await _index_queued(granted, state)
        assert len(embedder.texts) == 1 and not state.memory.unembedded
        stored = await store.scan_records("t", KIND, "s")
        assert len(stored) == 1
    finally:
        await state.embedder.close()
