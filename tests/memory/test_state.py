"""TenantState: the one place that keeps a tenant's structures and its index queue in step."""

from __future__ import annotations

import asyncio

import numpy as np

from proxy.memory.model import PROCEDURAL
from proxy.memory.ops import AddVectors, RemoveVectors
from proxy.memory.state import reverted
from tests.memory.units import memory, tenant_state, unit_vectors


def _drain(ops: asyncio.Queue) -> list:
    found = []
    while not ops.empty():
        found.append(ops.get_nowait())
    return found


async def test_insert_makes_memories_searchable_and_queues_their_vectors_in_one_op() -> None:
    state = tenant_state()
    vectors = unit_vectors(3)
    memories = [memory(state, f"fact number {i} about the {word}", vectors[i]) for i, word in enumerate(["boat", "kite", "lamp"])]
    state.insert(memories)
    assert state.memory.alive == 3 and not state.memory.unembedded
    (op,) = _drain(state.ops)
    assert isinstance(op, AddVectors) and op.tenant == "t"
    assert op.keys.tolist() == [m.key for m in memories] and np.array_equal(op.vectors, vectors)
    assert [h.id for h in state.memory.search("kite", None, state.scope_for("u", "s"), top_k=3, min_score=0.5)] == [memories[1].id]


async def test_loading_inserts_without_queueing_and_keys_are_never_handed_out_twice() -> None:
    state = tenant_state()
    loaded = [memory(state, "loaded from the store", unit_vectors(1)[0])]
    state.insert(loaded, index=False)  # the index is opened or rebuilt from the copies instead
    assert state.ops.empty() and state.memory.alive == 1
    assert state.allocate_key() == loaded[0].key + 1 and state.allocate_key() == loaded[0].key + 2


async def test_forget_removes_from_structures_and_procedures_and_queues_the_keys() -> None:
    state = tenant_state()
    rule = memory(state, "Always answer in French", type=PROCEDURAL)
    fact = memory(state, "The office is in Lyon", unit_vectors(1)[0])
    state.insert([rule, fact])
    _drain(state.ops)
    assert state.procedural == {rule.id: rule.text}
    state.forget([rule.id, fact.id, "never-stored"])
    assert state.procedural == {} and state.memory.alive == 0
    (op,) = _drain(state.ops)
    assert op == RemoveVectors("t", (rule.key, fact.key))
    state.forget(["never-stored"])
    assert state.ops.empty()  # nothing to remove: no op


async def test_a_vector_that_arrives_later_is_attached_once_and_queued() -> None:
    state = tenant_state()
    first, later = memory(state, "stored with a vector", unit_vectors(2)[0]), memory(state, "stored while the embedder was down")
    state.insert([first, later])
    _drain(state.ops)
    assert state.memory.unembedded == {later.id}
    later.vector = unit_vectors(2)[1]
    state.attach_vectors([later])
    (op,) = _drain(state.ops)
    assert op.keys.tolist() == [later.key] and not state.memory.unembedded
    state.attach_vectors([later])  # already held: nothing queued again
    assert state.ops.empty()


def test_the_user_and_scope_of_a_request() -> None:
    private, shared = tenant_state(), tenant_state(anonymous="shared", scope="tenant")
    assert private.user(None) is None and private.scope_for(None, "s").kind == "session"  # no user: the session only
    assert private.scope_for("alice", "s").kind == "user"
    assert shared.user(None) is not None and shared.scope_for(shared.user(None), "s").kind == "tenant"


def test_reverted_reads_the_rolled_back_seqs_and_ignores_malformed_entries() -> None:
    class Session:
        extra = {"rollbacks": [{"reverted": [3, 4, "x"]}, "junk", {"reverted": [9]}]}

    class Fresh:
        extra = None

    assert reverted(Session()) == {3, 4, 9} and reverted(Fresh()) == set()
