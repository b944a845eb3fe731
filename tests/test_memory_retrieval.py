"""Hybrid retrieval over one tenant's memory (no model: hand-made vectors)."""

from __future__ import annotations

import numpy as np
import pytest

from proxy.memory import lexical
from proxy.memory.model import EPISODIC, PROCEDURAL, SEMANTIC, Memory, Scope, text_hash
from proxy.memory.tenant import TenantMemory

DIM = 8


def _vec(*hot: int) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[list(hot)] = 1.0
    return vector / np.linalg.norm(vector)


def _memory(mem: TenantMemory, text: str, vector: np.ndarray | None, *, user: str | None = "alice", session: str | None = "s1",
            seq: int | None = None, type: str = EPISODIC, ts: float = 0.0) -> Memory:
    memory = Memory(id=f"m{len(mem.ids)}", type=type, text=text, ts=ts, key=len(mem.ids), user=user, session=session,
                    session_created=0.0 if session else None, seq=seq, vector=vector)
    mem.insert(memory)
    return memory


def test_tokenizer_stems_and_drops_stop_words_and_small_talk() -> None:
    assert lexical.tokenize("Caroline's paintings were painted in the mornings") == ["caroline", "paint", "paint", "morn"]
    assert not lexical.has_content("Thanks, that's great!") and lexical.has_content("Who is Bob?")


def test_scopes_filter_dense_and_lexical_candidates() -> None:
    mem = TenantMemory("t")
    mine = _memory(mem, "alice likes the harbour walk", _vec(0), user="alice", session="a1")
    other = _memory(mem, "alice likes the harbour walk too", _vec(0), user="bob", session="b1")
    shared = _memory(mem, "the harbour walk starts at pier 4", _vec(0, 1), user=None, session=None, type=SEMANTIC)
    query = _vec(0)
    ids = lambda scope: {h.id for h in mem.search("harbour walk", query, scope, top_k=10, min_score=0.1)}  # noqa: E731
    assert ids(Scope("user", "alice", "x")) == {mine.id, shared.id}
    assert ids(Scope("user", "bob", "x")) == {other.id, shared.id}
    assert ids(Scope("session", None, "a1")) == {mine.id, shared.id}
    assert ids(Scope("session", None, "elsewhere")) == {shared.id}
    assert ids(Scope("tenant", "carol", "x")) == {mine.id, other.id, shared.id}
    assert ids(Scope("user", "mallory", "x")) == {shared.id}


def test_threshold_dedup_against_context_and_lexical_only() -> None:
    mem = TenantMemory("t")
    hit = _memory(mem, "the invoice number is 4471", _vec(0))
    _memory(mem, "unrelated chatter about weather", _vec(5))
    scope = Scope("user", "alice", "x")
    found = mem.search("invoice number", _vec(0), scope, top_k=5, min_score=0.5)
    assert [h.id for h in found] == [hit.id]
    assert mem.search("invoice number", _vec(0), scope, top_k=5, min_score=0.5, exclude_hashes={text_hash("The invoice  number is 4471")}) == []
    lexical_only = mem.search("invoice number", None, scope, top_k=5, min_score=0.5)
    assert [h.id for h in lexical_only] == [hit.id] and lexical_only[0].cosine is None


def test_neighbours_of_a_hit_come_along_and_procedural_memories_are_not_ranked() -> None:
    mem = TenantMemory("t")
    question = _memory(mem, "where did you go on holiday", _vec(1), seq=0)
    answer = _memory(mem, "yes, last summer", _vec(2), seq=1)
    _memory(mem, "always answer in French", _vec(1), session=None, type=PROCEDURAL)
    found = mem.search("holiday", _vec(1), Scope("user", "alice", "x"), top_k=5, min_score=0.5)
    assert [h.id for h in found] == [question.id, answer.id]  # the answer rides with its question
    assert len(mem.procedural_for("alice")) == 1


def test_recency_weighting_prefers_newer_memories() -> None:
    mem = TenantMemory("t")
    old = _memory(mem, "the office wifi password is tulip", _vec(3), session="s1", ts=0.0)
    new = _memory(mem, "the office wifi password is orchid", _vec(3), session="s2", ts=86400.0 * 60)
    scope = Scope("user", "alice", "x")
    plain = mem.search("office wifi password", _vec(3), scope, top_k=2, min_score=0.1, now=86400.0 * 61)
    recent = mem.search("office wifi password", _vec(3), scope, top_k=2, min_score=0.1, half_life_days=7, now=86400.0 * 61)
    assert [h.id for h in plain][0] == old.id and [h.id for h in recent][0] == new.id


def test_removed_memories_are_not_found() -> None:
    mem = TenantMemory("t")
    gone = _memory(mem, "the launch code is 0000", _vec(4))
    mem.remove(gone.id)
    assert mem.search("launch code", _vec(4), Scope("user", "alice", "x"), top_k=5, min_score=0.0) == []
    assert mem.alive == 0


def test_bm25_document_frequencies_count_only_live_documents() -> None:
    index = lexical.BM25()
    for slot in range(4):
        index.add(slot, ["launch", f"word{slot}"])
    index.add(4, ["rare"])
    alive = np.ones(5, dtype=bool)
    before = index.search(["launch"], lambda slots: alive[slots], 5)
    index.remove(1), index.remove(2)
    alive[[1, 2]] = False
    slots, scores, best = index.search(["launch"], lambda slots: alive[slots], 5)
    assert sorted(slots.tolist()) == [0, 3] and len(index) == 3
    assert scores[0] > before[1][0]  # rarer among the live documents: a higher idf
    with pytest.raises(ValueError):
        index.add(0, ["again"])


def test_a_large_group_drops_its_exact_copies_once_indexed_and_is_still_searched(monkeypatch) -> None:
    from proxy.memory import tenant as tenant_module
    from proxy.memory.vectors import VectorIndex

    monkeypatch.setattr(tenant_module, "EXACT_MAX", 20)
    monkeypatch.setattr(tenant_module, "RELEASE_BATCH", 4)
    rng = np.random.default_rng(3)
    mem = TenantMemory("t")
    vectors = rng.standard_normal((60, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i, vector in enumerate(vectors):
        _memory(mem, f"note number {i} about topic{i}", vector, session=None)
    exact = mem.dense(vectors[7], Scope("user", "alice", "x"), mem.admit(Scope("user", "alice", "x")), 5)
    index = VectorIndex(DIM, "i8")
    index.add(mem.cols.ukey[:60], vectors)
    mem.vectors, mem.hnsw_ready = index, True
    assert mem.mirror is not None and mem.mirror.held(mem.user_code("alice")) == 0  # all released
    scope = Scope("user", "alice", "x")
    slots, sims = mem.dense(vectors[7], scope, mem.admit(scope), 5)
    assert slots.tolist() == exact[0].tolist() and np.allclose(sims, exact[1], atol=0.02)
    # A cosine outside of a search (a lexical-only candidate) is read back from the index.
    assert abs(float(mem.mirror.score(vectors[7], np.array([7]))[0]) - 1.0) < 0.02
    hits = mem.search("topic31", vectors[7], scope, top_k=60, min_score=-1.0)
    assert any(h.id == "m31" and h.cosine is not None and abs(h.cosine - float(vectors[31] @ vectors[7])) < 0.02 for h in hits)
    # Even while a rebuild is under way (hnsw_ready False), the index set meanwhile is searched.
    mem.hnsw_ready = False
    assert mem.dense(vectors[7], scope, mem.admit(scope), 5)[0].tolist() == exact[0].tolist()
    # New memories are held until the index has them, then released too; removals are forgotten.
    for i in range(60, 66):
        vector = rng.standard_normal(DIM).astype(np.float32)
        _memory(mem, f"note number {i}", vector / np.linalg.norm(vector), session=None)
    assert mem.mirror.held(mem.user_code("alice")) == 6  # the index holds none of them yet
    index.add(mem.cols.ukey[60:66], np.stack([mem.mirror.vector(s) for s in range(60, 66)]))
    _memory(mem, "note number 66", vectors[0], session=None)
    assert mem.mirror.held(mem.user_code("alice")) == 1
    mem.remove("m7")
    assert 7 not in mem.mirror and mem.mirror.size([mem.user_code("alice")]) == 66
    assert mem.dense(vectors[7], scope, mem.admit(scope), 5)[0].tolist()[:4] == exact[0].tolist()[1:5]


def test_key_slots_map_near_and_far_keys_and_forget_removed_ones() -> None:
    from proxy.memory.tenant import _KeySlots

    mapping = _KeySlots()
    mapping[5], mapping[2**40], mapping[0] = 50, 60, 70
    assert len(mapping) == 3 and mapping.get(5) == 50 and 2**40 in mapping and 6 not in mapping
    assert mapping.lookup(np.array([0, 5, 6, 2**40, 2**41], dtype=np.uint64)).tolist() == [70, 50, -1, 60, -1]
    assert mapping.pop(5) == 50 and mapping.pop(5) is None and 5 not in mapping
    assert sorted(mapping.values()) == [60, 70] and len(mapping) == 2
