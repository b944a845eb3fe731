"""The index worker applies typed ops in queue order; saves and opens the index file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from proxy.memory.index_worker import MANIFEST_KEY, MANIFEST_KIND, IndexWorker
from proxy.memory.ops import AddVectors, OpenIndex, RemoveVectors, SaveIndex
from proxy.storage.memory import InMemoryStore
from tests.memory.units import memory, tenant_state, unit_vectors


async def _worker(tmp_path: Path):
    ops: asyncio.Queue = asyncio.Queue()
    state = tenant_state(ops=ops)
    store = InMemoryStore()
    worker = IndexWorker({state.name: state}, ops, store, tmp_path)
    return state, store, worker


async def _run_until_applied(state, worker) -> None:
    """Run the worker until every queued op was applied, then stop it."""
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(state.ops.join(), 10)
    finally:
        task.cancel()
        worker.shutdown()


async def test_ops_are_applied_in_queue_order(tmp_path: Path) -> None:
    state, _, worker = await _worker(tmp_path)
    vectors = unit_vectors(4)
    memories = [memory(state, f"memory {i}", vectors[i]) for i in range(4)]
    state.insert(memories)  # AddVectors for all four
    state.forget([memories[1].id])  # then RemoveVectors for one
    state.ops.put_nowait(AddVectors(state.name, np.array([memories[1].key], dtype=np.uint64), vectors[1:2]))  # stale: forgotten
    await _run_until_applied(state, worker)
    index = state.memory.vectors
    assert index is not None and state.memory.hnsw_ready and state.dirty
    # Added, then removed: the removal came after the add. The later add of a forgotten
    # memory is dropped (no live slot), so the order of the queue decides what the index holds.
    assert sorted(int(k) for k in index.keys()) == sorted(m.key for m in memories if m is not memories[1])
    keys, sims = index.search(vectors[2], 1)
    assert int(keys[0]) == memories[2].key and sims[0] > 0.95


async def test_a_failed_op_is_logged_and_the_next_one_still_runs(tmp_path: Path, caplog) -> None:
    state, _, worker = await _worker(tmp_path)
    state.ops.put_nowait(RemoveVectors("gone", (1,)))  # a tenant the worker does not know
    vectors = unit_vectors(1)
    good = memory(state, "still indexed", vectors[0])
    state.insert([good])
    await _run_until_applied(state, worker)
    assert "index operation RemoveVectors for tenant gone failed" in caplog.text
    assert state.memory.vectors is not None and [int(k) for k in state.memory.vectors.keys()] == [good.key]


async def test_save_writes_the_file_and_its_manifest_and_open_loads_it_back(tmp_path: Path) -> None:
    state, store, worker = await _worker(tmp_path)
    vectors = unit_vectors(5, seed=3)
    memories = [memory(state, f"memory {i}", vectors[i]) for i in range(5)]
    state.insert(memories)
    while not state.ops.empty():
        await worker.apply(state.ops.get_nowait())
    await worker.apply(SaveIndex(state.name))
    manifest = await store.get_record(state.name, MANIFEST_KIND, MANIFEST_KEY)
    assert not state.dirty and worker.path(state.name).exists()
    assert manifest["count"] == 5 and manifest["model"] == state.model_name and manifest["next_key"] == state.memory.next_key

    # A fresh start: the same memories loaded, the file opened and found complete (no rebuild).
    again, _, worker2 = await _worker(tmp_path)
    worker2.store = store
    again.insert(memories, index=False)
    again.opening = True
    await worker2.apply(OpenIndex(again.name, manifest))
    assert again.memory.hnsw_ready and not again.dirty and "index_rebuilds" not in again.counters
    assert sorted(int(k) for k in again.memory.vectors.keys()) == sorted(m.key for m in memories)

    # A manifest that does not fit (another model) rebuilds from the copies instead.
    third, _, worker3 = await _worker(tmp_path)
    third.insert(memories[:3], index=False)
    await worker3.apply(OpenIndex(third.name, manifest | {"model": "another/model"}))
    assert third.counters["index_rebuilds"] == 1 and third.dirty
    assert sorted(int(k) for k in third.memory.vectors.keys()) == sorted(m.key for m in memories[:3])
    for w in (worker, worker2, worker3):
        w.shutdown()


async def test_a_save_when_quiet_waits_out_a_request_in_flight(tmp_path: Path) -> None:
    from proxy.priority import activity

    state, _, worker = await _worker(tmp_path)
    state.insert([memory(state, "one", unit_vectors(1)[0])])
    await worker.apply(state.ops.get_nowait())
    activity.started()
    try:
        await worker.apply(SaveIndex(state.name, when_quiet=True))
    finally:
        activity.ended()
    assert state.dirty and not worker.path(state.name).exists()  # a request came in: not now
    await worker.apply(SaveIndex(state.name))  # regardless
    assert not state.dirty and worker.path(state.name).exists()
    worker.shutdown()
