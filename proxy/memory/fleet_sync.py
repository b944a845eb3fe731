"""Fleet mode (PostgreSQL, ``replicas: many``): keep this replica's memory index, a cache of the
memories in PostgreSQL, in step with what the other replicas write, and index each recorded
message once per fleet.

* At start-up the cache is built from one snapshot of the tenant (``load``): the change-log
  head, sessions, marks and memories as of one moment; afterwards every change after that head
  is applied, in order, so nothing committed meanwhile is missed (applying one twice is
  harmless: a change names a memory, and applying it makes the cache hold what PostgreSQL
  holds now).
* A ``LISTEN`` connection wakes the tenant's follower at each commit that changed its memories;
  a poll every ``poll_s`` covers a lost connection or notification.
* Index keys (usearch labels) are this replica's own: each replica numbers the memories it
  holds, whoever wrote them, so two replicas never hand out the same number to two memories of
  one index. For the same reason the index is never saved: it is rebuilt from PostgreSQL at
  start-up (exact search over the vectors meanwhile).
* Episodic indexing is owed per session in PostgreSQL (proxy/storage/postgres_changes.py): the
  replica that records a turn indexes it as before and pays the debt with the session's mark; a
  debt without progress for ``grace_s`` (the replica died, or fell far behind) is claimed by one
  replica, which indexes what the session's mark does not cover yet.

A deployment with pgvector would search PostgreSQL instead of holding this cache: docs/MEMORY.md
(Fleet mode) says where it would plug in and whether it is worth it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable

import numpy as np

from proxy.memory.model import Memory
from proxy.storage.base import Record, StorageError, Write
from proxy.storage.kv import session_digest
from proxy.storage.postgres_changes import Change, MemoryFeed, close_quietly, decode_memories

log = logging.getLogger("agent_state_proxy.memory")

_PAGE = 500  # changes read at a time
_FETCH = 200  # memory records read back at a time
_SLICE = 64  # memories applied between two yields to the event loop
_LOAD_PAGE = 1024  # memories decoded at a time at start-up


class FleetSync:
    def __init__(self, service: Any, feed: MemoryFeed, mark: tuple[str, str], *, poll_s: float = 2.0, grace_s: float = 30.0,
                 sweep_s: float = 5.0, retention_s: float = 86_400.0) -> None:
        self.service, self.feed = service, feed
        self.mark = mark  # (kind, key) of a session's record "messages below this seq are indexed"
        self.poll_s, self.grace_s, self.sweep_s, self.retention_s = poll_s, grace_s, sweep_s, retention_s
        self.cursors: dict[str, int] = {}  # tenant -> newest change applied
        self._wake = {tenant: asyncio.Event() for tenant in service.settings}
        self._listener: Any = None

    @classmethod
    def of(cls, service: Any, mark: tuple[str, str], **timing: float) -> FleetSync | None:
        """The sync for the service's store, or None when the store is not a fleet's."""
        store = service.store
        if not getattr(store, "shared", False):
            return None
        feed_of = getattr(getattr(store, "inner", store), "memory_feed", None)
        feed = feed_of() if feed_of is not None else None
        return cls(service, feed, mark, **timing) if feed is not None else None

    def start(self) -> list[asyncio.Task[Any]]:
        tasks = [asyncio.create_task(self._listen(), name="memory-fleet-listen"),
                 asyncio.create_task(self._sweep(), name="memory-fleet-sweep")]
        tasks += [asyncio.create_task(self._follow(tenant), name=f"memory-fleet-{tenant}") for tenant in self._wake]
        return tasks

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        await close_quietly(listener)

    # -- start-up hooks (the loader) ---------------------------------------------------------

    async def load(self, tenant: str, model: str, decode: Callable[..., tuple[list[Memory], list[Record]]],
                   episodic: bool) -> list[tuple[Any, int]]:
        """Build the tenant's cache from one snapshot of PostgreSQL (one streamed query, not a
        few per session); returns the sessions with messages not indexed yet, with how far
        they are. ``decode`` turns stored rows into memories and the writes that erase orphans."""
        service = self.service
        writes: list[Record] = []
        async with self.feed.snapshot(tenant) as snapshot:
            head = await snapshot.head()  # changes after it are applied once the load is done
            sessions = {session.id: session for session in await snapshot.sessions()}
            marks = await snapshot.records(self.mark[0])
            async for page in snapshot.memories(_LOAD_PAGE):
                memories, erase = await asyncio.to_thread(_decode_page, page, decode, sessions, model)
                writes += erase
                for start in range(0, len(memories), _SLICE * 16):
                    service._insert_loaded(tenant, memories[start:start + _SLICE * 16])
                    await asyncio.sleep(0)
        self.cursors[tenant] = head  # not before: a load that failed half-way is reconciled in full instead
        for start in range(0, len(writes), 1000):  # orphans of sessions gone in the snapshot; old records split
            await service.store.apply([Write(tenant, records=writes[start:start + 1000])])
        behind = []
        for session in sessions.values() if episodic else ():
            mark = marks.get(session_digest(session.id))
            indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
            if session.next_seq > indexed:
                behind.append((session, indexed))
        return behind

    async def owe(self, tenant: str, sessions: list[tuple[Any, int]]) -> None:
        """Sessions found at start-up with messages not indexed yet: owed to the fleet (another
        replica may be indexing them right now), not indexed here at once."""
        if sessions:
            await self.feed.owe(tenant, [(session.id, session.next_seq - 1) for session, _ in sessions])

    async def indexed(self, tenant: str, marks: dict[str, int]) -> None:
        """The indexer committed these sessions' marks: their debts are paid up to them."""
        try:
            await self.feed.indexed(tenant, marks)
        except StorageError as exc:  # the debt stays; whoever claims it finds the mark and settles it
            log.warning("memory: could not settle indexed sessions of tenant %s: %s", tenant, exc)

    # -- following the change log ------------------------------------------------------------

    def _notified(self, tenant: str) -> None:
        wake = self._wake.get(tenant)
        if wake is not None:
            wake.set()

    async def _listen(self) -> None:
        delay = 1.0
        while True:
            try:
                self._listener = await self.feed.listen(self._notified)
                delay = 1.0
                for wake in self._wake.values():
                    wake.set()  # what committed while nobody listened
                while self._listener is not None and not self._listener.is_closed():
                    await asyncio.sleep(self.poll_s)
                log.warning("memory: the fleet's change notifications stopped; polling every %.0f s until they are back", self.poll_s)
            except StorageError as exc:
                log.warning("memory: cannot listen for the fleet's changes (%s); polling every %.0f s", exc, self.poll_s)
            finally:
                listener, self._listener = self._listener, None
                await close_quietly(listener)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _follow(self, tenant: str) -> None:
        await self.service.ready[tenant].wait()
        wake = self._wake[tenant]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_s)
            wake.clear()
            try:
                await self.catch_up(tenant)
            except Exception as exc:  # PostgreSQL away: the next round retries from the same cursor
                self.service.counters[tenant]["fleet_sync_errors"] += 1
                log.warning("memory: following the fleet's changes of tenant %s failed: %s", tenant, exc)
                await asyncio.sleep(self.poll_s)

    async def catch_up(self, tenant: str) -> int:
        """Apply every change of the tenant committed since the last call; how many."""
        applied = 0
        while True:
            cursor = self.cursors.get(tenant)
            if cursor is None:
                await self._reconcile(tenant)  # the load could not read the head
                continue
            head = await self.feed.head(tenant)  # first: every change up to it is committed, so readable
            changes = await self.feed.changes(tenant, cursor, _PAGE) if head > cursor else []
            if head > cursor and (not changes or changes[0][0] != cursor + 1):  # pruned before this replica read them
                log.warning("memory: tenant %s missed fleet changes after %d (pruned); reconciling with PostgreSQL", tenant, cursor)
                await self._reconcile(tenant)
                continue
            if not changes:
                return applied
            await self._apply(tenant, [change for _, change in changes])
            self.cursors[tenant] = changes[-1][0]
            applied += len(changes)
            if len(changes) < _PAGE:
                return applied

    async def _reconcile(self, tenant: str) -> None:
        """Make the cache hold what PostgreSQL holds, without the log: a full comparison of ids."""
        head = await self.feed.head(tenant)
        stored = await self.feed.stored(tenant)
        mem = self.service.memories[tenant]
        held = {mem.ids[slot] for slot in mem.key_slot.values() if mem.ids[slot]}
        gone = held - {change.memory_id for change in stored}
        if gone:
            self.service._forget(tenant, gone)
        await self._apply(tenant, sorted(change for change in stored if change.memory_id not in held))
        self.cursors[tenant] = head
        self.service.counters[tenant]["fleet_reconciled"] += 1

    async def _apply(self, tenant: str, changes: list[Change]) -> None:
        service = self.service
        mem, model = service.memories[tenant], service._model_name(tenant)
        unique = list(dict.fromkeys(changes))
        for start in range(0, len(unique), _FETCH):
            chunk = unique[start:start + _FETCH]
            stored = await self.feed.memories(tenant, chunk)
            for number, (_, memory_id) in enumerate(chunk):
                if number % _SLICE == _SLICE - 1:
                    await asyncio.sleep(0)
                found = stored.get(memory_id)
                if found is None:
                    if memory_id in mem.ids:
                        service._forget(tenant, [memory_id])
                    continue
                try:
                    memory = Memory.from_record(found[0], vector_value=found[1])
                except (ValueError, KeyError, TypeError):
                    log.error("memory: undecodable memory %r of tenant %s in the fleet's changes skipped", memory_id, tenant)
                    continue
                if memory.model != model:
                    memory.vector, memory.model = None, None  # another embedder's: this replica's indexer re-embeds it
                if memory_id not in mem.ids:
                    memory.key = service._allocate_key(mem)
                    service._insert(tenant, [memory])
                elif memory.vector is not None and memory_id in mem.unembedded:
                    slot = mem.attach_vector(memory_id, memory.vector)
                    if slot is not None:
                        service._ops.put_nowait(("add", tenant, np.array([mem.cols.ukey[slot]], dtype=np.uint64), memory.vector[None, :]))
            service.counters[tenant]["fleet_changes_applied"] += len(chunk)

    # -- episodic indexing owed by replicas that died ----------------------------------------

    async def _sweep(self) -> None:
        service = self.service
        episodic = [tenant for tenant, settings in service.settings.items() if settings.episodic]
        if not episodic:
            return
        registered = False
        pruned = 0.0
        while True:
            try:
                if not registered:  # first: from now on the tenants' recorded messages are owed
                    await self.feed.register(episodic)
                    registered = True
                await asyncio.sleep(self.sweep_s)
                ready = [tenant for tenant in episodic if service.ready[tenant].is_set()]
                for tenant, session, sid, upto in await self.feed.claim(ready, self.grace_s) if ready else ():
                    await self._pay(tenant, session, sid, upto)
                if time.monotonic() - pruned > 600:
                    pruned = time.monotonic()
                    await self.feed.prune(self.retention_s)
            except Exception as exc:
                log.warning("memory: the fleet's indexing sweep failed (%s); retrying", exc)
                await asyncio.sleep(self.sweep_s)

    async def _pay(self, tenant: str, session: Any, sid: bytes, upto: int) -> None:
        """Index what a claimed session still owes (another replica recorded it, then stopped)."""
        if session is None:
            await self.feed.settle(tenant, sid, upto)  # deleted: nothing to index
            return
        mark = await self.service.store.get_record(tenant, *self.mark, session.id)
        indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
        if indexed > upto or session.next_seq <= indexed:
            await self.feed.settle(tenant, sid, upto)  # paid meanwhile
            return
        self.service.counters[tenant]["fleet_claimed"] += 1
        log.info("memory: indexing session messages %d-%d of tenant %s left unindexed by another replica", indexed, upto, tenant)
        await self.service._catch_up(tenant, session, indexed)  # its mark pays the debt (indexed())


def _decode_page(page: list[tuple[bytes, bytes, bytes | None]], decode: Callable[..., tuple[list[Memory], list[Record]]],
                 sessions: dict[str, Any], model: str) -> tuple[list[Memory], list[Record]]:
    """A page of stored memories decoded (on a worker thread: ~0.1 ms a memory)."""
    rows = [(value.get("session") if sid else None, value, vector) for sid, value, vector in decode_memories(page)]
    return decode(rows, sessions, model)
