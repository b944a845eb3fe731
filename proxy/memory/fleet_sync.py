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
  one index. The index is saved in the replica's own directory with its key map and the
  change-log number it corresponds to (proxy/memory/fleet_index.py); at start-up a memory keeps
  its saved key unless a change after that number names it, and the saved graph is reused if
  the log still holds every change since (else it is rebuilt from the snapshot's vectors, exact
  search meanwhile).
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
from typing import Any, Mapping

from proxy.memory.fleet_index import ReplicaFiles, SavedIndex, SavedIndexError
from proxy.memory.indexer import MARK_KEY, MARK_KIND, Indexer
from proxy.memory.loader import decode_all
from proxy.memory.model import Memory
from proxy.memory.state import TenantState
from proxy.storage.base import Record, StorageError, Store, Write
from proxy.storage.kv import session_digest
from proxy.storage.postgres_changes import Change, MemoryFeed, close_quietly, decode_memories

log = logging.getLogger("agent_state_proxy.memory")

_PAGE = 500  # changes read at a time
_FETCH = 200  # memory records read back at a time
_SLICE = 64  # memories applied between two yields to the event loop
_LOAD_PAGE = 1024  # memories decoded at a time at start-up


class FleetSync:
    def __init__(self, tenants: Mapping[str, TenantState], store: Store, indexer: Indexer, feed: MemoryFeed, *, poll_s: float = 2.0,
                 grace_s: float = 30.0, sweep_s: float = 5.0, retention_s: float = 86_400.0) -> None:
        self.tenants, self.store, self.indexer, self.feed = tenants, store, indexer, feed
        self.poll_s, self.grace_s, self.sweep_s, self.retention_s = poll_s, grace_s, sweep_s, retention_s
        self.cursors: dict[str, int] = {}  # tenant -> newest change applied
        self.files: ReplicaFiles | None = None  # this replica's saved indexes (None: always rebuilt)
        self._wake = {tenant: asyncio.Event() for tenant in tenants}
        self._listener: Any = None

    @classmethod
    def of(cls, tenants: Mapping[str, TenantState], store: Store, indexer: Indexer, **timing: float) -> FleetSync | None:
        """The sync for this store, or None when the store is not a fleet's."""
        feed = store.memory_feed() if store.shared else None
        return cls(tenants, store, indexer, feed, **timing) if feed is not None else None

    def start(self) -> list[asyncio.Task[Any]]:
        tasks = [asyncio.create_task(self._listen(), name="memory-fleet-listen"),
                 asyncio.create_task(self._sweep(), name="memory-fleet-sweep")]
        tasks += [asyncio.create_task(self._follow(state), name=f"memory-fleet-{tenant}") for tenant, state in self.tenants.items()]
        return tasks

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        await close_quietly(listener)

    # -- start-up (the loader) ---------------------------------------------------------------

    async def load(self, state: TenantState) -> tuple[list[tuple[Any, int]], dict[str, Any]]:
        """Build the tenant's cache from one snapshot of PostgreSQL (one streamed query, not a
        few per session); returns the sessions with messages not indexed yet, with how far
        they are, and the manifest to open the index with: the saved index's when it still
        fits, else empty (rebuilt from the vectors)."""
        writes: list[Record] = []
        saved = await self._saved(state)
        changed: set[str] = set()
        async with self.feed.snapshot(state.name) as snapshot:
            head = await snapshot.head()  # changes after it are applied once the load is done
            if saved is not None:
                found = await snapshot.changed(saved.cursor, head)
                if found is None:
                    log.warning("memory: the saved index of tenant %s is at change %d, but the fleet's change log (head %d) no longer holds "
                                "every change since; rebuilding it from PostgreSQL", state.name, saved.cursor, head)
                    state.counters["index_rebuilds"] += 1
                    saved = None
                else:
                    changed = found  # changed while this replica was away: their saved vectors are not trusted
                    state.memory.next_key = max(state.memory.next_key, saved.next_key)  # fresh keys above the file's
            sessions = {session.id: session for session in await snapshot.sessions()}
            marks = await snapshot.records(MARK_KIND)
            async for page in snapshot.memories(_LOAD_PAGE):
                memories, erase = await asyncio.to_thread(_decode_page, page, sessions, state.model_name)
                writes += erase
                for start in range(0, len(memories), _SLICE * 16):
                    chunk = memories[start:start + _SLICE * 16]
                    for memory in chunk:  # keys are per replica: the saved one, or a fresh one
                        # (a memory without a vector takes a fresh one too: the saved key, if the
                        # file holds it, is removed and must never be added again)
                        reuse = saved is not None and memory.vector is not None and memory.id not in changed
                        key = saved.keys.get(memory.id) if reuse else None
                        memory.key = state.allocate_key() if key is None else key
                    state.insert(chunk, index=False)  # the index is built from the copies once loaded
                    await asyncio.sleep(0)
        self.cursors[state.name] = head  # not before: a load that failed half-way is reconciled in full instead
        for start in range(0, len(writes), 1000):  # orphans of sessions gone in the snapshot; old records split
            await self.store.apply([Write(state.name, records=writes[start:start + 1000])])
        behind = []
        for session in sessions.values() if state.settings.episodic else ():
            mark = marks.get(session_digest(session.id))
            indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
            if session.next_seq > indexed:
                behind.append((session, indexed))
        if saved is None:
            return behind, {}
        log.info("memory: tenant %s: %d memories changed since the saved index (change %d of %d)", state.name, len(changed), saved.cursor, head)
        return behind, {"digest": saved.digest, "model": saved.model, "dim": saved.dim, "next_key": saved.next_key, "verify": True}

    async def _saved(self, state: TenantState) -> SavedIndex | None:
        """This replica's saved manifest of the tenant, if there is one it can use."""
        if self.files is None:
            return None
        try:
            saved = await asyncio.to_thread(self.files.read, state.name)
        except SavedIndexError as exc:
            log.warning("memory: saved index of tenant %s unusable (%s); rebuilding it from PostgreSQL", state.name, exc)
            state.counters["index_rebuilds"] += 1
            return None
        if saved is not None and saved.model != state.model_name:
            log.warning("memory: saved index of tenant %s holds vectors of %s, the tenant now embeds with %s; rebuilding it",
                        state.name, saved.model, state.model_name)
            state.counters["index_rebuilds"] += 1
            return None
        return saved

    async def owe(self, state: TenantState, sessions: list[tuple[Any, int]]) -> None:
        """Sessions found at start-up with messages not indexed yet: owed to the fleet (another
        replica may be indexing them right now), not indexed here at once."""
        if sessions:
            await self.feed.owe(state.name, [(session.id, session.next_seq - 1) for session, _ in sessions])

    async def indexed(self, state: TenantState, marks: dict[str, int]) -> None:
        """The indexer committed these sessions' marks: their debts are paid up to them."""
        try:
            await self.feed.indexed(state.name, marks)
        except StorageError as exc:  # the debt stays; whoever claims it finds the mark and settles it
            log.warning("memory: could not settle indexed sessions of tenant %s: %s", state.name, exc)

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
            except Exception as exc:  # never ends: the poll covers meanwhile
                log.warning("memory: cannot listen for the fleet's changes (%s); polling every %.0f s", exc, self.poll_s)
            finally:
                listener, self._listener = self._listener, None
                await close_quietly(listener)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _follow(self, state: TenantState) -> None:
        await state.ready.wait()
        wake = self._wake[state.name]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_s)
            wake.clear()
            try:
                await self.catch_up(state)
            except Exception as exc:  # PostgreSQL away: the next round retries from the same cursor
                state.counters["fleet_sync_errors"] += 1
                log.warning("memory: following the fleet's changes of tenant %s failed: %s", state.name, exc)
                await asyncio.sleep(self.poll_s)

    async def catch_up(self, state: TenantState) -> int:
        """Apply every change of the tenant committed since the last call; how many."""
        applied = 0
        while True:
            cursor = self.cursors.get(state.name)
            if cursor is None:
                await self._reconcile(state)  # the load could not read the head
                continue
            head = await self.feed.head(state.name)  # first: every change up to it is committed, so readable
            changes = await self.feed.changes(state.name, cursor, _PAGE) if head > cursor else []
            if head > cursor and (not changes or changes[0][0] != cursor + 1):  # pruned before this replica read them
                log.warning("memory: tenant %s missed fleet changes after %d (pruned); reconciling with PostgreSQL", state.name, cursor)
                await self._reconcile(state)
                continue
            if not changes:
                return applied
            await self._apply(state, [change for _, change in changes])
            self.cursors[state.name] = changes[-1][0]
            applied += len(changes)
            if len(changes) < _PAGE:
                return applied

    async def _reconcile(self, state: TenantState) -> None:
        """Make the cache hold what PostgreSQL holds, without the log: a full comparison of ids."""
        head = await self.feed.head(state.name)
        stored = await self.feed.stored(state.name)
        mem = state.memory
        held = {mem.ids[slot] for slot in mem.key_slot.values() if mem.ids[slot]}
        gone = held - {change.memory_id for change in stored}
        if gone:
            state.forget(gone)
        await self._apply(state, sorted(change for change in stored if change.memory_id not in held))
        self.cursors[state.name] = head
        state.counters["fleet_reconciled"] += 1

    async def _apply(self, state: TenantState, changes: list[Change]) -> None:
        mem = state.memory
        unique = list(dict.fromkeys(changes))
        for start in range(0, len(unique), _FETCH):
            chunk = unique[start:start + _FETCH]
            stored = await self.feed.memories(state.name, chunk)
            for number, (_, memory_id) in enumerate(chunk):
                if number % _SLICE == _SLICE - 1:
                    await asyncio.sleep(0)
                found = stored.get(memory_id)
                if found is None:
                    if memory_id in mem.ids:
                        state.forget([memory_id])
                    continue
                try:
                    memory = Memory.from_record(found[0], vector_value=found[1])
                except (ValueError, KeyError, TypeError):
                    log.error("memory: undecodable memory %r of tenant %s in the fleet's changes skipped", memory_id, state.name)
                    continue
                if memory.model != state.model_name:
                    memory.vector, memory.model = None, None  # another embedder's: this replica's indexer re-embeds it
                slot = mem.ids.slot(memory_id)
                if slot is None:
                    memory.key = state.allocate_key()
                    state.insert([memory])
                elif memory.vector is not None and memory_id in mem.unembedded:
                    memory.key = int(mem.cols.ukey[slot])  # this replica's key for it
                    state.attach_vectors([memory])
            state.counters["fleet_changes_applied"] += len(chunk)

    # -- episodic indexing owed by replicas that died ----------------------------------------

    async def _sweep(self) -> None:
        episodic = [tenant for tenant, state in self.tenants.items() if state.settings.episodic]
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
                ready = [tenant for tenant in episodic if self.tenants[tenant].ready.is_set()]
                for tenant, session, sid, upto in await self.feed.claim(ready, self.grace_s) if ready else ():
                    await self._pay(self.tenants[tenant], session, sid, upto)
                if time.monotonic() - pruned > 600:
                    pruned = time.monotonic()
                    await self.feed.prune(self.retention_s)
            except Exception as exc:
                log.warning("memory: the fleet's indexing sweep failed (%s); retrying", exc)
                await asyncio.sleep(self.sweep_s)

    async def _pay(self, state: TenantState, session: Any, sid: bytes, upto: int) -> None:
        """Index what a claimed session still owes (another replica recorded it, then stopped)."""
        if session is None:
            await self.feed.settle(state.name, sid, upto)  # deleted: nothing to index
            return
        mark = await self.store.get_record(state.name, MARK_KIND, MARK_KEY, session.id)
        indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
        if indexed > upto or session.next_seq <= indexed:
            await self.feed.settle(state.name, sid, upto)  # paid meanwhile
            return
        state.counters["fleet_claimed"] += 1
        log.info("memory: indexing session messages %d-%d of tenant %s left unindexed by another replica", indexed, upto, state.name)
        await self.indexer.catch_up(state, session, indexed)  # its mark pays the debt (indexed())


def _decode_page(page: list[tuple[bytes, bytes, bytes | None]], sessions: dict[str, Any], model: str) -> tuple[list[Memory], list[Record]]:
    """A page of stored memories decoded (on a worker thread: ~0.1 ms a memory)."""
    rows = [(value.get("session") if sid else None, value, vector) for sid, value, vector in decode_memories(page)]
    return decode_all(rows, sessions, model)
