"""Write-behind buffering over a Store: durable writes now, routine writes batched later.

Routine writes are acknowledged once queued and reach the store in batches (one transaction
per batch); reads see them immediately through an overlay. A durable write first drains the
queue into the same transaction, so the store never holds a later write without an earlier
one: a crash loses at most the tail of the queue, never the middle.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, Sequence

from proxy.cache import LRU, FrequencyCache
from proxy.records import Message, Session
from proxy.storage.base import Encoded, InvalidWrite, Quarantined, Store, StorageError, Write

log = logging.getLogger("agent_state_proxy.storage")
STALLED_AFTER = 30.0  # seconds queued writes may wait without progress before readiness fails

_SessionKey = tuple[str, str]
_RecordKey = tuple[str, str, str | None, str]


class _Transcript:
    """A cached transcript: its messages by seq, and in seq order. A request appends messages
    with new, higher seqs, so the order is kept by appending; any other change rebuilds it on
    the next read (not a sort of the whole session on every request)."""

    __slots__ = ("by_seq", "_ordered")

    def __init__(self, messages: Iterable[Message]) -> None:
        self.by_seq = {m.seq: m for m in messages}
        self._ordered: list[Message] | None = None

    def __len__(self) -> int:
        return len(self.by_seq)

    def update(self, messages: Iterable[Message]) -> None:
        ordered = self._ordered
        for message in messages:
            if ordered is not None and (message.seq in self.by_seq or (ordered and ordered[-1].seq > message.seq)):
                ordered = None
            elif ordered is not None:
                ordered.append(message)
            self.by_seq[message.seq] = message
        self._ordered = ordered

    def messages(self) -> list[Message]:
        """The messages in seq order (a new list: callers may change it)."""
        if self._ordered is None:
            self._ordered = [self.by_seq[seq] for seq in sorted(self.by_seq)]
        return list(self._ordered)


class WriteBehindStore(Store):
    def __init__(self, inner: Store, *, batch_size: int = 256, flush_interval: float = 0.05, queue_max: int = 10_000,
                 cached_sessions: int = 256, cached_messages: int = 50_000) -> None:
        self.inner = inner
        # Other processes write the same sessions (PostgreSQL fleet mode): nothing is cached
        # across requests and no write that touches a session is queued, since another replica
        # would neither see a queued write nor tell this one that a cached transcript changed.
        # Such writes are each one transaction before they are acknowledged; tenant-wide ones
        # (token counts, memories) are still queued (docs/PERSISTENCE.md: Fleet mode).
        self.shared = inner.shared
        if self.shared:
            cached_sessions = cached_messages = 0
        # Decoded transcripts of recently used sessions. This process is the only writer of its
        # LMDB environment and every write passes through here, so the cache stays exact; it
        # saves decoding a whole transcript on every request of a long session.
        # Bounded by sessions and by messages (storage.transcript_cache_messages), or a few long
        # sessions would hold gigabytes. Sessions used most often stay (proxy/cache.py): under a
        # plain LRU, the sessions a burst had touched pushed the hot ones out, which then read
        # their transcripts from the store again (docs/PERSISTENCE.md: Caches).
        self.cached_sessions, self.cached_messages = cached_sessions, cached_messages
        self._transcripts: FrequencyCache[_SessionKey, _Transcript] = FrequencyCache(
            cached_messages, weigh=len, max_entries=cached_sessions)
        # Stored sessions of recently used ones, exact for the same reason: every request reads
        # its session, and an LMDB read lets go of the GIL, which the event loop then waits to
        # get back (docs/PERSISTENCE.md: Caches).
        self._stored_sessions: LRU[_SessionKey, Session] = LRU(cached_sessions)
        self._writes_seen = 0  # bumped by every write, to detect one racing a cache fill
        self.batch_size, self.flush_interval, self.queue_max = batch_size, flush_interval, queue_max
        self._queue: collections.deque[Write] = collections.deque()
        self._sessions: dict[_SessionKey, Session | None] = {}  # None: deleted
        self._messages: dict[_SessionKey, dict[int, Message]] = {}
        self._records: dict[_RecordKey, dict[str, Any] | None] = {}
        self._lock = asyncio.Lock()  # one flush at a time, in queue order
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.failure: Exception | None = None  # the last flush failure, until a flush succeeds
        self.flushed_batches = 0
        self._progress_at = time.monotonic()  # when the queue last moved (or was empty)
        # Writes the store refused at commit (kept for inspection; a bounded number of them).
        self.quarantined_writes: collections.deque[Quarantined] = collections.deque(maxlen=1000)
        self.quarantined_count = 0
        self.on_flush: Callable[[int, float], None] | None = None  # (writes, seconds) of each batch: metrics

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flusher(), name="write-behind-flusher")

    async def close(self) -> None:
        """Flush every good write, then close the inner store, whatever a flush raised."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.critical("closing with %d writes not flushed: %s", len(self._queue), exc)
        finally:
            await self.inner.close()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def health(self) -> str | None:
        """Why this store cannot take writes now (for readiness), or None when it can."""
        if self._task is not None and self._task.done():
            return "the write-behind flusher has stopped"
        if self.failure is not None:
            return f"storage writes are failing: {self.failure}"
        if self._queue and time.monotonic() - self._progress_at > STALLED_AFTER:
            return f"{len(self._queue)} queued writes made no progress for over {STALLED_AFTER:g}s"
        return None

    # -- writes ------------------------------------------------------------------------------

    def check(self, writes: Sequence[Write]) -> list[Encoded]:
        return self.inner.check(writes)

    async def apply(self, writes: Sequence[Write], durable: bool = True) -> None:
        """Durable: returns once these writes (and everything queued before) are committed.
        Routine (``durable=False``): queued, visible to reads at once, committed by the next
        batch; durable at once when the store is shared with other replicas."""
        if not durable:
            return await self._queue_writes(writes)
        async with self._lock:
            queued = len(self._queue)
            try:
                await self.inner.apply(list(self._queue) + list(writes))
            except StorageError:
                raise
            except Exception as exc:  # a queued write the store refuses must not block this one
                if isinstance(exc, InvalidWrite):
                    self.inner.check(writes)  # a bad write fails its own caller; nothing was committed
                log.error("a queued write failed to commit (%s); committing the queue one write at a time", exc)
                await self._commit_singly(queued)
                await self.inner.apply(list(writes))
            else:
                self._forget(queued)
            self._progress_at = time.monotonic()
            for write in writes:
                self._remember(_frozen_copy(write))
        await self._notify_drained()

    def session_lock(self, tenant: str, session_id: str, refuse: bool) -> Any:
        return self.inner.session_lock(tenant, session_id, refuse)

    async def _queue_writes(self, writes: Sequence[Write]) -> None:
        if self.shared and any(_touches_session(write) for write in writes):
            return await self.apply(writes)  # the next replica to hold the session must see it
        encoded = self.inner.check(writes)  # refused now, not found unstorable by the flusher later
        if len(self._queue) >= self.queue_max:
            # Backpressure instead of unbounded memory: wait for the flusher to make room.
            self._wakeup.set()
            async with self._drained:
                await self._drained.wait_for(lambda: len(self._queue) < self.queue_max)
        if not self._queue:
            self._progress_at = time.monotonic()
        for write, raw in zip(writes, encoded):
            write = _frozen_copy(write, raw)  # committed as these bytes: encoded once
            self._queue.append(write)
            self._overlay(write)
            self._remember(write)
        if len(self._queue) >= self.batch_size:
            self._wakeup.set()

    async def flush(self) -> None:
        while self._queue:
            async with self._lock:
                count = min(len(self._queue), self.batch_size)
                batch = [self._queue[i] for i in range(count)]
                began = time.perf_counter()
                try:
                    await self.inner.apply(batch)
                except StorageError:
                    raise
                except Exception as exc:  # one bad write: commit the others, set it aside
                    log.error("a batch of %d writes failed to commit (%s); committing them one at a time", count, exc)
                    await self._commit_singly(count)
                else:
                    self._forget(count)
                self._progress_at = time.monotonic()
                self.flushed_batches += 1
                if self.on_flush is not None:
                    self.on_flush(count, time.perf_counter() - began)
        self.failure = None
        await self._notify_drained()

    async def _commit_singly(self, count: int) -> None:
        """Commit the first ``count`` queued writes one transaction each, in order; a write the
        store refuses for anything but a storage failure is quarantined and the rest go on."""
        for _ in range(count):
            write = self._queue[0]
            try:
                await self.inner.apply([write])
            except StorageError:
                raise
            except Exception as exc:
                self._quarantine(write, exc)
            self._forget(1)

    def _quarantine(self, write: Write, exc: Exception) -> None:
        """Set aside a write the store refused: kept (summarised) for /admin/recovery, counted,
        logged; the caches that had it are dropped, since they now differ from the store."""
        session_id = write.session.id if write.session else write.delete_session
        summary = {
            "session": session_id,
            "messages": [m.seq for m in write.messages],
            "records": [f"{r.kind}/{r.key}" for r in write.records][:20],
        }
        self.quarantined_writes.append(Quarantined(write.tenant, f"write:{session_id}", f"{type(exc).__name__}: {exc}",
                                                   time.time(), extra=summary))
        self.quarantined_count += 1
        log.critical("quarantined a queued write of tenant %s that the store refused (%s: %s): %s",
                     write.tenant, type(exc).__name__, exc, summary)
        if session_id is not None:
            self._transcripts.pop((write.tenant, session_id))
            self._stored_sessions.pop((write.tenant, session_id))

    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Loud, and the writes stay queued: they are retried, never dropped. Readiness
                # reports the failure until a flush succeeds.
                self.failure = exc
                log.critical("write-behind flush failed (%d writes pending): %s", len(self._queue), exc)
                await asyncio.sleep(1.0)

    def _forget(self, count: int) -> None:
        """Drop committed writes from the queue; overlay entries go once nothing newer replaced them."""
        for _ in range(count):
            write = self._queue.popleft()
            key = (write.tenant, write.session.id) if write.session else None
            if key and self._sessions.get(key) is write.session:
                del self._sessions[key]
            if key and write.messages:
                overlay = self._messages.get(key, {})
                for message in write.messages:
                    if overlay.get(message.seq) is message:
                        del overlay[message.seq]
                if not overlay:
                    self._messages.pop(key, None)
            for record in write.records:
                rkey = (write.tenant, record.kind, record.session_id, record.key)
                if rkey in self._records and self._records[rkey] is record.value:
                    del self._records[rkey]
            if write.delete_session is not None:
                dkey = (write.tenant, write.delete_session)
                if dkey in self._sessions and self._sessions[dkey] is None:
                    del self._sessions[dkey]

    def _remember(self, write: Write) -> None:
        """Keep cached transcripts and sessions in step with a write (a frozen copy: its
        session is this store's own)."""
        self._writes_seen += 1
        if write.delete_session is not None:
            self._transcripts.pop((write.tenant, write.delete_session))
            self._stored_sessions.pop((write.tenant, write.delete_session))
        if write.session is not None:
            self._cache_session((write.tenant, write.session.id), write.session)
        if write.session is not None and write.messages:
            key = (write.tenant, write.session.id)
            cached = self._transcripts.peek(key)
            if cached is not None:
                cached.update(write.messages)
                self._transcripts.put(key, cached)  # re-weighed

    async def _notify_drained(self) -> None:
        async with self._drained:
            self._drained.notify_all()

    def _overlay(self, write: Write) -> None:
        if write.delete_session is not None:
            key = (write.tenant, write.delete_session)
            self._sessions[key] = None
            self._messages.pop(key, None)
            for rkey in [k for k in self._records if k[0] == write.tenant and k[2] == write.delete_session]:
                del self._records[rkey]
        if write.session is not None:
            key = (write.tenant, write.session.id)
            self._sessions[key] = write.session
            if write.messages:
                self._messages.setdefault(key, {}).update({m.seq: m for m in write.messages})
        for record in write.records:
            self._records[(write.tenant, record.kind, record.session_id, record.key)] = record.value

    # -- reads (store + overlay) -------------------------------------------------------------

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        key = (tenant, session_id)
        if key in self._sessions:
            found = self._sessions[key]
            return dataclasses.replace(found, extra=dict(found.extra)) if found else None
        cached = self._stored_sessions.get(key)
        if cached is not None:
            return dataclasses.replace(cached, extra=dict(cached.extra))
        writes_before = self._writes_seen
        found = await self.inner.get_session(tenant, session_id)
        if found is not None and self._writes_seen == writes_before:
            self._cache_session(key, dataclasses.replace(found, extra=dict(found.extra)))
        return found

    def _cache_session(self, key: _SessionKey, session: Session) -> None:
        """Keep ``session``, an object no caller holds (callers mutate the ones they hold)."""
        self._stored_sessions.put(key, session)

    async def get_messages(self, tenant: str, session_id: str) -> list[Message]:
        key = (tenant, session_id)
        if key in self._sessions and self._sessions[key] is None:
            return []
        cached = self._transcripts.get(key)
        if cached is not None:
            return cached.messages()
        writes_before = self._writes_seen
        stored = await self.inner.get_messages(tenant, session_id)
        if self.cached_messages and self._writes_seen == writes_before and len(stored) <= 5000:
            self._cache_transcript(key, stored)
        overlay = self._messages.get(key)
        if not overlay:
            return stored
        merged = {m.seq: m for m in stored} | {seq: dataclasses.replace(m) for seq, m in overlay.items()}
        return [merged[seq] for seq in sorted(merged)]

    def _cache_transcript(self, key: _SessionKey, stored: list[Message]) -> None:
        transcript = _Transcript(stored)
        transcript.update(sorted(self._messages.get(key, {}).values(), key=lambda m: m.seq))  # writes not flushed yet
        self._transcripts.put(key, transcript)

    async def list_sessions(self, tenant: str) -> list[Session]:
        sessions = {s.id: s for s in await self.inner.list_sessions(tenant)}
        for (owner, sid), session in self._sessions.items():
            if owner == tenant:
                if session is None:
                    sessions.pop(sid, None)
                else:
                    sessions[sid] = dataclasses.replace(session)
        return list(sessions.values())

    async def get_record(self, tenant: str, kind: str, key: str, session_id: str | None = None) -> dict[str, Any] | None:
        rkey = (tenant, kind, session_id, key)
        if rkey in self._records:
            return self._records[rkey]
        if session_id is not None and self._sessions.get((tenant, session_id), 1) is None:
            return None
        return await self.inner.get_record(tenant, kind, key, session_id)

    async def scan_records(self, tenant: str, kind: str, session_id: str | None = None, prefix: str = "",
                           after: str = "", limit: int = 0) -> list[tuple[str, dict[str, Any]]]:
        if session_id is not None and self._sessions.get((tenant, session_id), 1) is None:
            return []
        while True:
            stored = await self.inner.scan_records(tenant, kind, session_id, prefix, after, limit)
            # A full page covers keys up to its last one; queued writes beyond it belong to later pages.
            last = stored[-1][0] if limit and len(stored) == limit else None
            found = dict(stored)
            for (owner, rkind, rsid, rkey), value in self._records.items():
                if (owner == tenant and rkind == kind and rsid == session_id and rkey.startswith(prefix)
                        and rkey > after and (last is None or rkey <= last)):
                    if value is None:
                        found.pop(rkey, None)
                    else:
                        found[rkey] = value
            if found or last is None:  # queued deletions may empty a page that is not the last
                return sorted(found.items())
            after = last

    async def quarantined(self, tenant: str | None = None) -> list[Quarantined]:
        refused = [q for q in self.quarantined_writes if tenant is None or q.tenant == tenant]
        return await self.inner.quarantined(tenant) + refused

    async def quarantine_messages(self, tenant: str, session_id: str, reasons: dict[int, str]) -> None:
        await self.inner.quarantine_messages(tenant, session_id, reasons)
        self._writes_seen += 1  # a cache fill racing this must not keep the moved messages
        self._transcripts.pop((tenant, session_id))

    def damage(self) -> str | None:
        return self.inner.damage()

    def memory_feed(self) -> Any:
        return self.inner.memory_feed()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats() | {"pending_writes": len(self._queue), "flushed_batches": self.flushed_batches,
                                     "flush_failure": str(self.failure) if self.failure else None,
                                     "writer": self.health() or "ok", "quarantined_writes": self.quarantined_count,
                                     "transcript_cache": self._transcripts.stats()}


def _touches_session(write: Write) -> bool:
    return (write.session is not None or write.delete_session is not None
            or any(record.session_id is not None for record in write.records))


def _frozen_copy(write: Write, encoded: Encoded | None = None) -> Write:
    """Queue a snapshot: callers keep mutating their Session objects after handing them over
    (and what is committed is ``encoded``, the bytes checked when it was queued, if given)."""
    session = dataclasses.replace(write.session, extra=dict(write.session.extra)) if write.session else None
    return Write(write.tenant, session, list(write.messages), list(write.records), write.delete_session, encoded)
