"""The memories API behind /v1/memories and the admin pages: add, get, list, search, delete,
forget a session's or rolled-back messages' memories, statistics, and vacuum."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Mapping

from proxy.errors import BadRequest, NotFound, NotReady
from proxy.memory.index_worker import IndexWorker
from proxy.memory.indexer import Indexer
from proxy.memory.model import KIND, SEMANTIC, TYPES, Memory, Scope, new_id
from proxy.memory.recall import Recaller
from proxy.memory.state import TenantState, reverted
from proxy.memory.tenant import Hit, index_text
from proxy.storage.base import Store, Write

log = logging.getLogger("agent_state_proxy.memory")

_EMBED_TIMEOUT = 30.0  # a new memory's embedding; stored lexically (re-embedded later) past it


class MemoryApi:
    def __init__(self, tenants: Mapping[str, TenantState], store: Store, recaller: Recaller, indexer: Indexer, worker: IndexWorker) -> None:
        self.tenants, self.store = tenants, store
        self.recaller, self.indexer, self.worker = recaller, indexer, worker

    def _tenant(self, tenant: str) -> TenantState:
        state = self.tenants.get(tenant)
        if state is None:
            raise BadRequest("long-term memory is disabled for this tenant (memory.enabled, stateless)", code="memory_disabled")
        if not state.ready.is_set():
            raise NotReady("long-term memory is still loading; retry shortly")
        return state

    async def add(self, tenant: str, content: str, type: str = SEMANTIC, user: str | None = None,
                  session: str | None = None, metadata: dict[str, Any] | None = None) -> Memory:
        """Store a semantic or procedural memory now (embedded at once when the embedder is up)."""
        state = self._tenant(tenant)
        created = None
        if session is not None:
            found = await self.store.get_session(tenant, session)
            if found is None:
                raise NotFound(f"no session '{session}' for this tenant", code="session_not_found")
            created = found.created_at
        memory = Memory(id=new_id(), type=type, text=content, ts=time.time(), key=state.allocate_key(),
                        user=user, session=session, session_created=created, metadata=metadata or None)
        embedder = state.embedder
        if embedder.index is not None:
            try:
                vector = await asyncio.wait_for(embedder.index.embed(index_text(memory)[:4000]), _EMBED_TIMEOUT)
                memory.vector, memory.model = vector, embedder.model_name
            except (asyncio.TimeoutError, Exception) as exc:  # stored lexically; re-embedded later
                state.counters["embedder_errors"] += 1
                log.warning("memory: embedding a new memory failed for tenant %s: %s", tenant, exc)
        await self.store.apply([Write(tenant, records=memory.records())])
        state.insert([memory])
        if memory.vector is None and embedder.index is not None:  # it came up meanwhile: embed now
            self.indexer.queue_reembedding(state)
        return memory

    async def get(self, tenant: str, memory_id: str) -> Memory:
        mem = self._tenant(tenant).memory
        slot = mem.ids.slot(memory_id)
        value = None
        if slot is not None:
            value = await self.store.get_record(tenant, KIND, memory_id, mem.where[slot][0])
        if value is None:
            raise NotFound(f"no memory '{memory_id}' for this tenant", code="memory_not_found")
        return Memory.from_record(value)

    async def list(self, tenant: str, *, type: str | None = None, user: str | None = None, session: str | None = None,
                   limit: int = 100, after: str | None = None) -> tuple[list[Memory], bool]:
        """Memories in insertion order (oldest first), ``limit`` after the id ``after``."""
        mem = self._tenant(tenant).memory
        start = 0
        if after is not None:
            slot = mem.ids.slot(after)
            if slot is None:
                raise BadRequest(f"'after': no memory '{after}' for this tenant", code="invalid_cursor")
            start = slot + 1
        cols = mem.cols
        user_code = mem.user_code(user) if user is not None else None
        sessions = set(mem.sessions_named(session)) if session is not None else None
        type_code = TYPES.index(type) if type is not None else None
        found: list[Memory] = []
        more = False
        for slot in range(start, len(mem.ids)):
            if not cols.alive[slot]:
                continue
            if type_code is not None and cols.kind[slot] != type_code:
                continue
            if user_code is not None and cols.user[slot] != user_code:
                continue
            if sessions is not None and int(cols.session[slot]) not in sessions:
                continue
            if len(found) >= limit:
                more = True
                break
            value = await self.store.get_record(tenant, KIND, mem.ids[slot] or "", mem.where[slot][0])
            if value is not None:
                found.append(Memory.from_record(value, with_vector=False))
        return found, more

    async def search(self, tenant: str, query: str, scope: Scope, *, top_k: int, types: Iterable[str],
                     min_score: float | None = None) -> tuple[list[tuple[Memory, Hit]], str | None]:
        state = self._tenant(tenant)
        settings = state.settings
        hits, degraded = await self.recaller.search(state, query, scope, top_k, settings.min_score if min_score is None else min_score,
                                                    settings.recency_half_life_days, set(), types)
        memories = await self.recaller.fetch(state, hits, scope, top_k)
        by_id = {h.id: h for h in hits}
        return [(m, by_id[m.id]) for m in memories], degraded

    async def delete(self, tenant: str, memory_id: str) -> None:
        state = self._tenant(tenant)
        slot = state.memory.ids.slot(memory_id)
        if slot is None:
            raise NotFound(f"no memory '{memory_id}' for this tenant", code="memory_not_found")
        await self.store.apply([Write(tenant, records=Memory.erasure(memory_id, state.memory.where[slot][0]))])
        state.forget([memory_id])

    async def forget_session(self, tenant: str, session_id: str) -> int:
        """Drop a deleted session's memories from the index (LMDB erased them with the session)."""
        state = self.tenants.get(tenant)
        if state is None:
            return 0
        ids = state.memory.session_memories(session_id)
        state.forget(ids)
        state.sessions_forgotten += 1
        return len(ids)

    async def forget_messages(self, tenant: str, session_id: str, seqs: Iterable[int]) -> int:
        """Forget the memories of rolled-back messages, in LMDB and in the index."""
        state = self.tenants.get(tenant)
        wanted = set(seqs)
        if state is None or not wanted:
            return 0
        mem = state.memory
        doomed = [(mem.ids[s], mem.where[s][0]) for code in mem.sessions_named(session_id)
                  for s in list(mem.session_slots.get(code, ())) if mem.ids[s] and int(mem.cols.seq[s]) in wanted]
        if doomed:
            await self.store.apply([Write(tenant, records=[r for i, sid in doomed for r in Memory.erasure(i, sid)])])
            state.forget([i for i, _ in doomed])
        return len(doomed)

    async def vacuum(self, tenant: str) -> int:
        """Forget memories of sessions that no longer exist (deleted by any path) or were rolled back."""
        state = self.tenants[tenant]
        mem = state.memory
        doomed: list[str] = []
        for code, (sid, created) in enumerate(list(mem.session_ids)):
            slots = mem.session_slots.get(code)
            if not slots:
                continue
            if code % 32 == 31:
                await asyncio.sleep(0)  # session reads from LMDB do not suspend: let requests in
            session = await self.store.get_session(tenant, sid)
            if session is None or session.created_at != created:
                doomed += [mem.ids[s] for s in slots if mem.ids[s]]
                continue
            rolled_back = reverted(session)
            if rolled_back:
                for slot in list(slots):
                    memory_id = mem.ids[slot]
                    if memory_id and int(mem.cols.seq[slot]) in rolled_back:
                        doomed.append(memory_id)
        if doomed:
            state.forget(doomed)
        return len(doomed)

    def stats(self, tenant: str) -> dict[str, Any]:
        state = self.tenants.get(tenant)
        if state is None:
            return {"enabled": False}
        settings, mem, embedder = state.settings, state.memory, state.embedder
        return {
            "enabled": True,
            "ready": state.ready.is_set(),
            "scope": settings.scope,
            "embedder": {"name": embedder.model_name, "ready": embedder.query is not None, "error": embedder.error, "dim": embedder.dim},
            "index": mem.stats() | {"hnsw_ready": mem.hnsw_ready, "dtype": self.worker.dtype, "pending_jobs": self.indexer.jobs.qsize(),
                                    "pending_index_ops": self.worker.ops.qsize()},
            "counters": dict(state.counters),
            "recall_latency_ms": _percentiles(state.latencies) | {"budget": settings.latency_budget_ms},
            # the floor of a recall: its query's embedding, as measured under the real load
            "query_embedding_ms": _percentiles(state.embedding_latencies),
        }


def _percentiles(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p99": None}
    return {"count": len(ordered), "p50": round(ordered[len(ordered) // 2], 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)}
