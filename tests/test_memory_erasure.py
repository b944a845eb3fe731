"""Erasure: deleting a session (admin API or TTL expiry), a memory, or rolling turns back
removes the memories from LMDB and from the index, and they never come back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant, write_config
from tests.memory_helpers import SLOW_OK, chat, drain, injected_ids, memory_stats, memory_text, running

SECRET = "My passport number is X9931-227 and it expires in March."
ASK = "What is my passport number?"
MEMORY = {"latency_budget_ms": SLOW_OK}


def _memory_ids(proxy: ProxyThread) -> set[str]:
    return {m["id"] for m in httpx.get(f"{proxy.url}/v1/memories?limit=1000").json()["data"]}


def _stored(proxy: ProxyThread, session: str) -> list[tuple[str, str]]:
    """(kind, key) of the session's memory records and vector records in LMDB."""
    assert proxy.app is not None
    store = proxy.app[keys.STORE]
    return [(kind, key) for kind in ("memory", "memory_vector") for key, _ in proxy.call(store.scan_records("local", kind, session))]


def _indexed_keys(proxy: ProxyThread) -> int:
    return memory_stats(proxy)["index"]["hnsw_entries"]


def test_deleting_a_session_erases_its_memories_everywhere(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory=MEMORY)})
    with running(path) as proxy:
        chat(proxy, SECRET, user="alice", session="travel")
        chat(proxy, "Book the 9:40 train to Ghent.", user="alice", session="other")
        drain(proxy)
        travel = {m["id"] for m in httpx.get(f"{proxy.url}/v1/memories?session_id=travel").json()["data"]}
        assert len(travel) == 2 and _indexed_keys(proxy) == 4
        assert sorted(_stored(proxy, "travel")) == sorted((kind, key) for kind in ("memory", "memory_vector") for key in travel)

        assert httpx.delete(f"{proxy.url}/admin/sessions/travel").status_code == 200
        drain(proxy)
        assert not travel & _memory_ids(proxy) and _stored(proxy, "travel") == []
        assert _indexed_keys(proxy) == 2 and memory_stats(proxy)["index"]["memories"] == 2
        for memory_id in travel:
            assert httpx.get(f"{proxy.url}/v1/memories/{memory_id}").status_code == 404
        _, headers = chat(proxy, ASK, user="alice", session="asking")
        assert "X9931" not in memory_text(upstream.chat_requests[-1])
    # And after a restart (LMDB is the source of truth) they stay gone.
    with running(path) as proxy:
        drain(proxy)
        assert not travel & _memory_ids(proxy)
        chat(proxy, ASK, user="alice", session="asking-again")
        assert "X9931" not in memory_text(upstream.chat_requests[-1])


def test_ttl_expiry_by_the_janitor_erases_memories(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory=MEMORY, session_ttl_seconds=1)
    path = write_config(tmp_path, {"local": tenant}, server={"janitor_interval_seconds": 1})
    with running(path) as proxy:
        chat(proxy, SECRET, user="alice", session="travel")
        drain(proxy)
        assert _indexed_keys(proxy) == 2
        deadline = time.monotonic() + 15
        while httpx.get(f"{proxy.url}/admin/sessions/travel").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        drain(proxy)
        assert _memory_ids(proxy) == set() and _stored(proxy, "travel") == [] and _indexed_keys(proxy) == 0
        _, headers = chat(proxy, ASK, user="alice", session="later")
        assert injected_ids(headers) == []


def test_a_session_deleted_behind_the_index_is_never_recalled(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Any path that deletes a session (here the store directly, like the expiry in the pipeline)
    # erases the records; recall validates against LMDB and drops what is gone.
    path = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory=MEMORY)})
    with running(path) as proxy:
        chat(proxy, SECRET, user="alice", session="travel")
        drain(proxy)
        assert proxy.call(proxy.app[keys.STORE].delete_session("local", "travel"))
        _, headers = chat(proxy, ASK, user="alice", session="later")
        assert injected_ids(headers) == [] and "X9931" not in memory_text(upstream.chat_requests[-1])
        assert memory_stats(proxy)["counters"]["stale_dropped"] >= 1


def test_rolled_back_turns_are_never_recalled(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory=MEMORY)})
    with running(path) as proxy:
        chat(proxy, "We will fly to Lisbon on the 3rd.", user="alice", session="trip")
        chat(proxy, SECRET, user="alice", session="trip", history=[
            {"role": "user", "content": "We will fly to Lisbon on the 3rd."},
            {"role": "assistant", "content": "echo: We will fly to Lisbon on the 3rd."},
        ])
        drain(proxy)
        rolled = httpx.post(f"{proxy.url}/admin/sessions/trip/rollback", json={"turns": 1})
        assert rolled.status_code == 200, rolled.text
        drain(proxy)
        assert len(_stored(proxy, "trip")) == 4  # the first turn stays remembered: 2 memories, 2 vectors
        _, headers = chat(proxy, ASK, user="alice", session="later")
        assert "X9931" not in memory_text(upstream.chat_requests[-1])
        _, headers = chat(proxy, "When do we fly to Lisbon?", user="alice", session="later2")
        assert "Lisbon on the 3rd" in memory_text(upstream.chat_requests[-1])


def test_a_session_deleted_while_its_memories_are_being_indexed_leaves_none_behind(tmp_path: Path, upstream: FakeUpstream, monkeypatch) -> None:
    """Indexing makes a batch searchable a few memories at a time, yielding to requests in
    between; a session erased in one of those pauses keeps none of the rest. (The erasure is
    made to complete within the first pause, so the test does not depend on timing.)"""
    import asyncio

    from proxy.memory import indexer as service_module

    monkeypatch.setattr(service_module, "_INSERT_SLICE", 1)
    path = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory=MEMORY)})
    with running(path) as proxy:
        drain(proxy)
        memory = proxy.app[keys.PIPELINE].memory
        state = memory.tenants["local"]
        insert, erased = state.insert, []

        def insert_then_erase(memories: list) -> None:
            insert(memories)
            if memories and not erased:  # the admin API's deletion, in the first pause
                async def delete() -> None:  # as admin_delete_session does
                    async with proxy.app[keys.PIPELINE].locks.hold("local", "travel", refuse_when_busy=False):
                        assert await proxy.app[keys.STORE].delete_session("local", "travel")
                    await memory.forget_session("local", "travel")
                erased.append(asyncio.get_running_loop().create_task(delete()))

        class PauseUntilErased:  # the service's asyncio, whose pauses last until the erasure is done
            def __getattr__(self, name: str) -> Any:
                return getattr(asyncio, name)

            @staticmethod
            async def sleep(delay: float, result: Any = None) -> Any:
                if erased and not erased[0].done():
                    await asyncio.shield(erased[0])
                return await asyncio.sleep(delay, result)

        monkeypatch.setattr(state, "insert", insert_then_erase)
        monkeypatch.setattr(service_module, "asyncio", PauseUntilErased())
        earlier = [{"role": role, "content": f"Packing list item {i}: socks number {i}."}
                   for i in range(12) for role in ("user", "assistant")]
        chat(proxy, SECRET, user="alice", session="travel", history=earlier)  # 26 memories, one batch
        drain(proxy)
        async def erasure() -> None:
            await erased[0]

        proxy.call(erasure())
        assert memory_stats(proxy)["index"]["memories"] == 0 and _stored(proxy, "travel") == []
        _, headers = chat(proxy, ASK, user="alice", session="asking")
        assert injected_ids(headers) == [] and "X9931" not in memory_text(upstream.chat_requests[-1])
