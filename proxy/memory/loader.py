"""Start-up loading of a tenant: memory records from LMDB into the searchable structures, a
page at a time, in the background; then the index is opened (by the index worker) and
messages recorded but not yet indexed are queued for the indexer."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from proxy.memory.indexer import MARK_KEY, MARK_KIND, Indexer
from proxy.memory.index_worker import MANIFEST_KEY, MANIFEST_KIND
from proxy.memory.model import KIND, VECTOR_KIND, Memory
from proxy.memory.ops import OpenIndex
from proxy.memory.state import TenantState, reverted
from proxy.storage.base import Record, Store, Write

if TYPE_CHECKING:
    from proxy.memory.fleet_sync import FleetSync

log = logging.getLogger("agent_state_proxy.memory")

_LOAD_PAGE = 1024  # memory records decoded at a time at start-up
_INSERT_CHUNK = 1000  # loaded memories made searchable between two yields to the event loop


class Loader:
    def __init__(self, store: Store, indexer: Indexer, fleet: FleetSync | None = None) -> None:
        self.store, self.indexer = store, indexer
        self.fleet = fleet  # fleet mode: loaded from one snapshot of PostgreSQL

    async def load(self, state: TenantState) -> None:
        """Load one tenant; whatever fails, it is marked ready (its memory starts empty)."""
        try:
            await self._load(state)
        except Exception:
            log.exception("memory: loading tenant %s failed; its memory starts empty", state.name)
        finally:
            state.ready.set()
        if state.embedder.index is not None:
            self.indexer.queue_reembedding(state)  # the embedder was up before this tenant finished loading

    async def _load(self, state: TenantState) -> None:
        started = time.perf_counter()
        tenant, mem = state.name, state.memory
        if self.fleet is not None:
            catch_up, manifest = await self.fleet.load(state)  # the replica's own saved index, if it still fits
        else:
            catch_up, manifest = await self._load_all(state), await self.store.get_record(tenant, MANIFEST_KIND, MANIFEST_KEY) or {}
        mem.next_key = max(mem.next_key, int(manifest.get("next_key", 0)))
        state.opening = True
        await state.ops.put(OpenIndex(tenant, manifest))
        log.info("memory: tenant %s: %d memories loaded from LMDB in %.0f ms", tenant, mem.alive, (time.perf_counter() - started) * 1000)
        self.indexer.queue_reembedding(state)
        if self.fleet is not None:  # owed to the fleet: indexed once, by whichever replica claims it
            await self.fleet.owe(state, catch_up)
            return
        for session, indexed in catch_up:
            await self.indexer.catch_up(state, session, indexed)

    async def _load_all(self, state: TenantState) -> list[tuple[Any, int]]:
        """Every memory of the tenant, session by session; returns the sessions with messages
        not indexed yet, with how far they are."""
        tenant = state.name
        sessions = {s.id: s for s in await self.store.list_sessions(tenant)}
        await self._load_records(state, None, sessions)
        catch_up: list[tuple[Any, int]] = []
        for sid, session in sessions.items():
            await self._load_records(state, sid, sessions)
            mark = await self.store.get_record(tenant, MARK_KIND, MARK_KEY, sid)
            indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
            if session.next_seq > indexed and state.settings.episodic:
                catch_up.append((session, indexed))
            await asyncio.sleep(0)  # LMDB reads do not suspend: let requests in between sessions
        return catch_up

    async def _load_records(self, state: TenantState, session_id: str | None, sessions: dict[str, Any]) -> None:
        """Load the memory records of a tenant (session_id None) or of one session, with their
        vectors, a page at a time: 100k records decoded at once would hold ~0.6 GB for a moment."""
        tenant, after = state.name, ""
        while page := await self.store.scan_records(tenant, KIND, session_id, after=after, limit=_LOAD_PAGE):
            vectors = await self._vector_records(tenant, session_id, after, page)
            after = page[-1][0]
            rows = [(session_id, value, vectors.get(key)) for key, value in page]
            memories, writes = await asyncio.to_thread(decode_all, rows, sessions, state.model_name)
            if writes:  # orphans of sessions replaced meanwhile or rolled back, erased
                await self.store.apply([Write(tenant, records=writes)])
            for start in range(0, len(memories), _INSERT_CHUNK):
                state.insert(memories[start:start + _INSERT_CHUNK], index=False)
                await asyncio.sleep(0)

    async def _vector_records(self, tenant: str, session_id: str | None, after: str, page: list[tuple[str, Any]]) -> dict[str, Any]:
        """The vector records of the memories in ``page`` (keys after ``after``, up to its last):
        they are stored under the same keys, so one scan over the same range finds them."""
        last, found = page[-1][0], {}
        while True:
            rows = await self.store.scan_records(tenant, VECTOR_KIND, session_id, after=after, limit=len(page))
            for key, value in rows:
                if key > last:
                    return found
                found[key] = value
            if len(rows) < len(page) or rows[-1][0] == last:  # the range is done: no read past it
                return found
            after = rows[-1][0]


def decode_all(rows: list[tuple[str | None, dict[str, Any], dict[str, Any] | None]], sessions: dict[str, Any],
               model: str) -> tuple[list[Memory], list[Record]]:
    """Decode stored memories (worker thread): rows of (session, record, vector record). Also
    returns the writes to make: erasing those that must not survive."""
    memories, writes = [], []
    reverted_of: dict[str, set[int]] = {}
    for sid, value, vector in rows:
        try:
            memory = Memory.from_record(value, vector_value=vector)
        except (ValueError, KeyError, TypeError):
            log.error("memory: undecodable memory record %r skipped", value.get("id") if isinstance(value, dict) else None)
            continue
        if sid is not None:
            session = sessions.get(sid)
            if sid not in reverted_of and session is not None:
                reverted_of[sid] = reverted(session)
            if session is None or session.created_at != memory.session_created or (memory.seq is not None and memory.seq in reverted_of.get(sid, set())):
                writes += Memory.erasure(memory.id, sid)
                continue
        if memory.model != model:
            memory.vector, memory.model = None, None  # another embedder's vector: re-embedded later
        memories.append(memory)
    return memories, writes
