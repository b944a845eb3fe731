"""Hybrid retrieval over one tenant's memory (no model: hand-made vectors)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import lexical
from proxy.memory.model import EPISODIC, PROCEDURAL, SEMANTIC, TYPES, Memory, Scope, text_hash
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


_TERMS = ["harbour", "walk", "pier", "tulip", "orchid", "invoice", "launch", "code"]


def _bm25_model(docs: dict[int, list[str]], present: set[int], terms: list[str], admitted: np.ndarray, limit: int,
                scope_docs: int | None) -> tuple[list[tuple[int, float]], dict[int, float], float]:
    """BM25.search as it was written, term by term in plain Python from the documents themselves:
    the top ``limit`` (slot, score) pairs (equal scores by slot), every admitted match's score,
    and the ideal score."""
    k1, b = 1.2, 0.75
    if not present:
        return [], {}, 0.0
    total = max(scope_docs if scope_docs is not None else len(present), 1)
    avg = max(sum(len(docs[slot]) for slot in present) / len(present), 1e-6)
    scores: dict[int, float] = {}
    ideal = 0.0
    for term in set(terms):
        matches = [slot for slot, words in docs.items() if term in words and admitted[slot]]
        if not matches:
            continue
        df = len(matches)
        idf = math.log(1.0 + max(total - df + 0.5, 0.5) / (df + 0.5))
        ideal += idf * (k1 + 1.0)
        for slot in matches:
            tf = docs[slot].count(term)
            scores[slot] = scores.get(slot, 0.0) + idf * (k1 + 1.0) * tf / (tf + k1 * (1.0 - b + b * len(docs[slot]) / avg))
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:limit], scores, ideal


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TERMS), max_size=10), max_size=40)
       | st.lists(st.lists(st.sampled_from(_TERMS), min_size=1, max_size=10), min_size=25, max_size=60), st.data())
def test_bm25_search_matches_the_term_by_term_model(texts: list[list[str]], data: st.DataObject) -> None:
    # Slots spread out and added in any order; removals; an admit mask that may or may not hide
    # the removed slots; a scope size or none; small samples (``sample``) so that small indexes
    # take the top-``limit`` threshold path of large ones too.
    slots = data.draw(st.lists(st.integers(0, 3 * len(texts) + 2), min_size=len(texts), max_size=len(texts), unique=True))
    docs = dict(zip(slots, texts))
    index = lexical.BM25()
    index.sample = data.draw(st.sampled_from([2048, 1, 2, 3, 5, 8]))
    for slot, words in docs.items():
        index.add(slot, words)
    removed = data.draw(st.sets(st.sampled_from(slots))) if slots else set()
    for slot in removed:
        index.remove(slot)
    present = set(slots) - removed
    end = max(slots, default=0) + 1
    mode = data.draw(st.sampled_from(["present", "random", "random-present", "all-but-a-few", "everything"]))
    admitted = np.ones(end, dtype=bool)
    if mode.startswith("random"):
        admitted = np.array(data.draw(st.lists(st.booleans(), min_size=end, max_size=end)), dtype=bool)
    elif mode == "all-but-a-few" and slots:
        admitted[sorted(data.draw(st.sets(st.sampled_from(slots), min_size=1, max_size=3)))] = False
    if mode.endswith("present"):
        admitted &= np.isin(np.arange(end), sorted(present))
    query = data.draw(st.lists(st.sampled_from([*_TERMS, "unknown"]), max_size=12)
                      | st.lists(st.sampled_from(_TERMS), min_size=3))
    limit = data.draw(st.integers(0, 12) | st.integers(0, 3))
    scope_docs = data.draw(st.none() | st.integers(0, 60))

    found, scores, ideal = index.search(query, lambda s: admitted[s], limit, scope_docs)
    ranked, every, best = _bm25_model(docs, present, query, admitted, limit, scope_docs)

    assert found.dtype == np.int64 and scores.dtype == np.float32 and found.shape == scores.shape
    assert math.isclose(ideal, best, rel_tol=1e-6)
    assert len(found) == len(ranked) and len(set(found.tolist())) == len(found)
    for position, (slot, score) in enumerate(zip(found.tolist(), scores.tolist())):
        expected_slot, expected = ranked[position]
        assert math.isclose(score, expected, rel_tol=1e-5)
        if slot != expected_slot:  # another slot only if its score is the same up to float rounding
            assert math.isclose(every[slot], expected, rel_tol=1e-5)
    for (slot, score), (after, later) in zip(zip(found.tolist(), scores.tolist()), zip(found[1:].tolist(), scores[1:].tolist())):
        assert score > later or (score == later and slot < after)  # best first, equal scores by slot


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 200), st.integers(0, 15), st.sampled_from([2048, 1, 2, 3, 5, 8]), st.data())
def test_bm25_top_slots_are_the_best_scores_equal_ones_by_slot(size: int, limit: int, sample: int, data: st.DataObject) -> None:
    # The selection alone, with many ties and samples small enough to be unlucky (fewer than
    # ``limit`` slots at or above the sampled threshold).
    values = st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0]) | st.floats(0.0, 4.0, width=32)
    scores = np.array(data.draw(st.lists(values, min_size=size, max_size=size)), dtype=np.float32)
    if data.draw(st.booleans()):
        scores = np.sort(scores)[:: data.draw(st.sampled_from([1, -1]))]  # best first: a sample of the best
    index = lexical.BM25()
    index.sample = sample
    expected = sorted(np.flatnonzero(scores).tolist(), key=lambda slot: (-scores[slot], slot))[:limit]
    found, top = index._top(scores.copy(), size, limit)
    assert found.tolist() == expected and top.tolist() == scores[expected].tolist()


def test_bm25_top_slots_when_the_sample_holds_only_the_best() -> None:
    index = lexical.BM25()
    index.sample = 1  # one slot sampled, the best: a threshold only it reaches
    scores = np.linspace(4.0, 1.0, 40, dtype=np.float32)
    assert index._top(scores.copy(), len(scores), 3)[0].tolist() == [0, 1, 2]


def _admitted_model(memory: Memory, alive: bool, scope: Scope, types: tuple[str, ...]) -> bool:
    """TenantMemory.admit's rule for one memory, from the memory's fields (Scope's docstring)."""
    if not alive or memory.type not in types:
        return False
    tenant_wide = memory.user is None and memory.session is None
    if scope.kind == "tenant" or tenant_wide:
        return True
    if scope.kind == "user":
        return memory.user == scope.user
    return bool(scope.session) and memory.session == scope.session or (
        scope.user is not None and memory.user == scope.user and memory.session is None)


def test_admit_matches_the_scope_rules_for_every_scope_and_type_set() -> None:
    # Every kind of memory (owner, session, its creation time: two sessions share a name, type,
    # removed or not), checked in a shuffled order with repeats under every scope and type set.
    mem = TenantMemory("t")
    memories, alive = [], []
    for user, session, created, type, gone in itertools.product(
            [None, "alice", "bob"], [None, "s1", "s2"], [0.0, 1.0], TYPES, [False, True]):
        if session is None and created:
            continue
        memory = Memory(id=f"m{len(memories)}", type=type, text="note", ts=0.0, key=len(memories), user=user, session=session,
                        session_created=created if session else None)
        mem.insert(memory)
        if gone:
            mem.remove(memory.id)
        memories.append(memory)
        alive.append(not gone)
    slots = np.random.default_rng(3).permutation(np.concatenate([np.arange(len(memories)), np.arange(0, len(memories), 7)]))
    for kind, user, session in itertools.product(["user", "session", "tenant"], [None, "alice", "bob", "carol"],
                                                 [None, "", "s1", "s2", "s3"]):
        scope = Scope(kind, user, session)
        for count in range(len(TYPES) + 1):
            for types in itertools.combinations(TYPES, count):
                expected = [_admitted_model(memories[s], alive[s], scope, types) for s in slots.tolist()]
                assert mem.admit(scope, types)(slots).tolist() == expected, (scope, types)


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
    from proxy.memory.columns import KeySlots

    mapping = KeySlots()
    mapping[5], mapping[2**40], mapping[0] = 50, 60, 70
    assert len(mapping) == 3 and mapping.get(5) == 50 and 2**40 in mapping and 6 not in mapping
    assert mapping.lookup(np.array([0, 5, 6, 2**40, 2**41], dtype=np.uint64)).tolist() == [70, 50, -1, 60, -1]
    assert mapping.pop(5) == 50 and mapping.pop(5) is None and 5 not in mapping
    assert sorted(mapping.values()) == [60, 70] and len(mapping) == 2
    assert sorted(mapping.array().tolist()) == [60, 70]
