"""The indexer: turns recorded messages into episodic memories in the background (never on
the request path): embeds them in small batches, stores them with the session's mark (what is
indexed), and makes them searchable; also re-embeds memories stored without a vector."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from proxy.jobs import Claims
from proxy.memory.model import EPISODIC, KIND, Memory, episodic_id, message_text
from proxy.memory.state import TenantState
from proxy.memory.tenant import index_text
from proxy.pacing import Pace
from proxy.records import Message
from proxy.storage.base import Record, Store, Write

log = logging.getLogger("agent_state_proxy.memory")

MARK_KIND, MARK_KEY = "memory_mark", "next"  # session-scoped: messages below this seq were indexed
MAX_TEXT = 8000
QUEUE_MAX = 100_000
_CONTEXT_CHARS = 500  # of the previous message, indexed with each message
_INDEX_CHUNK = 8  # texts per background embedding call: small, so a call is short
# Jobs indexed together: their memories become searchable together once all are embedded, so
# a small batch keeps them searchable soon after they are recorded (docs/BENCHMARKS.md).
_INDEX_BATCH = 32
_INSERT_SLICE = 8  # memories made searchable between two yields to the event loop: a short slice

_Incarnation = tuple[str | None, float | None]  # (session id, created_at)


@dataclass
class Job:
    tenant: str
    memory: Memory | None  # a new episodic memory (None: only advance the mark)
    session: str | None = None
    created: float | None = None
    mark: int | None = None  # the session's messages below this seq are handled by this job
    reembed: str | None = None  # id of a stored memory that still lacks a vector


class Indexer:
    def __init__(self, tenants: Mapping[str, TenantState], store: Store, claims: Claims | None = None) -> None:
        self.tenants, self.store = tenants, store
        self.claims = claims or Claims()
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self._reembedding: set[str] = set()  # ids queued for a vector they are missing
        # Told the sessions whose marks were committed (session id -> mark): fleet mode settles
        # what they owed (proxy/memory/fleet_sync.py).
        self.on_marked: Callable[[TenantState, dict[str, int]], Awaitable[None]] | None = None

    # -- queueing ----------------------------------------------------------------------------

    async def queue_messages(self, state: TenantState, session: Any, user: str | None, messages: list[Message],
                             parent: Message | None) -> None:
        """Queue recorded messages of a session (``parent``: the one the first answers)."""
        if self.jobs.qsize() >= QUEUE_MAX:
            state.counters["index_dropped"] += len(messages)
            return
        mark = max(m.seq for m in messages) + 1
        known = {m.seq: m for m in messages} | ({parent.seq: parent} if parent is not None else {})
        jobs: list[Job] = []
        pace = Pace()  # a new session of thousands of messages: its jobs are made in slices
        for m in messages:
            if (memory := episodic(state.name, session.id, session.created_at, user, m, known.get(m.parent))) is not None:
                jobs.append(Job(state.name, memory, session.id, session.created_at))
            await pace.tick()
        jobs.append(Job(state.name, None, session.id, session.created_at, mark=mark))
        for job in jobs:
            self.jobs.put_nowait(job)

    async def catch_up(self, state: TenantState, session: Any, indexed: int) -> None:
        """Index messages recorded but not yet remembered when the proxy last stopped."""
        everything = await self.store.get_messages(state.name, session.id)
        by_seq = {m.seq: m for m in everything}
        messages = [m for m in everything if m.seq >= indexed]
        if not messages:
            return
        user = state.user(session.user_id)
        for message in messages:
            memory = episodic(state.name, session.id, session.created_at, user, message, by_seq.get(message.parent))
            if memory is not None:
                self.jobs.put_nowait(Job(state.name, memory, session.id, session.created_at))
        self.jobs.put_nowait(Job(state.name, None, session.id, session.created_at, mark=max(m.seq for m in messages) + 1))

    def queue_reembedding(self, state: TenantState, limit: int = 2000) -> None:
        if state.embedder.index is None and state.embedder.error:
            return  # still down: the next round tries again
        for memory_id in list(state.memory.unembedded - self._reembedding)[:limit]:
            self._reembedding.add(memory_id)
            self.jobs.put_nowait(Job(state.name, None, reembed=memory_id))

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            jobs = [await self.jobs.get()]
            while len(jobs) < _INDEX_BATCH and not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            try:
                by_tenant: dict[str, list[Job]] = {}
                for job in jobs:
                    by_tenant.setdefault(job.tenant, []).append(job)
                for tenant, batch in by_tenant.items():
                    state = self.tenants[tenant]
                    await state.ready.wait()
                    try:
                        await self.index(state, batch)
                    except Exception:
                        log.exception("memory: indexing %d items of tenant %s failed", len(batch), tenant)
            finally:
                for _ in jobs:
                    self.jobs.task_done()

    async def index(self, state: TenantState, jobs: list[Job]) -> None:
        reembed = [j.reembed for j in jobs if j.reembed]
        for memory_id in reembed:
            self._reembedding.discard(memory_id)
        if not reembed:
            await self._index(state, jobs, [])
            return
        # In a fleet every replica notices a memory stored without a vector; one re-embeds the
        # tenant's (a remote embedder bills each call) and the others receive the vectors through
        # the change feed (proxy/memory/fleet_sync.py). Refused: the next round asks again.
        async with self.claims.claim(f"reembed:{state.name}") as granted:
            await self._index(state, jobs, reembed if granted else [])

    async def _index(self, state: TenantState, jobs: list[Job], reembed: list[str]) -> None:
        tenant, mem, embedder = state.name, state.memory, state.embedder
        if embedder.local and embedder.index is None and embedder.error is None:
            with contextlib.suppress(asyncio.TimeoutError):  # the local model is still loading
                await asyncio.wait_for(embedder.ready.wait(), 30)
        fresh = {j.memory.id: j.memory for j in jobs if j.memory is not None and j.memory.id not in mem.ids}
        memories = list(fresh.values())  # a message queued twice (recorded during start-up) counts once
        for memory_id in reembed:
            slot = mem.ids.slot(memory_id)
            value = await self.store.get_record(tenant, KIND, memory_id, mem.where[slot][0]) if slot is not None else None
            if value is not None:
                memories.append(Memory.from_record(value, with_vector=False))
                memories[-1].key = int(mem.cols.ukey[slot])  # this index's key (in a fleet each replica numbers its own)
        # Sessions must still exist (and be the same incarnation) before and after the write.
        sessions = {(j.session, j.created) for j in jobs if j.session is not None}
        gone = await self._gone(tenant, sessions)
        memories = _alive(memories, gone)
        if memories and embedder.index is not None:
            texts = [index_text(m)[:4000] for m in memories]
            try:
                vectors = []
                for start in range(0, len(texts), _INDEX_CHUNK):
                    vectors.extend(await embedder.index.embed_many(texts[start:start + _INDEX_CHUNK]))
                for memory, vector in zip(memories, vectors):
                    memory.vector, memory.model = vector, embedder.model_name
            except Exception as exc:
                state.counters["embedder_errors"] += 1
                log.warning("memory: embedding %d memories of tenant %s failed (%s); stored lexically, retried later", len(texts), tenant, exc)
        for memory in memories:
            if memory.id not in mem.ids:
                memory.key = state.allocate_key()
        records = [record for m in memories for record in m.records()]
        marks: dict[_Incarnation, int] = {}
        for job in jobs:
            if job.mark is not None and job.session is not None and (job.session, job.created) not in gone:
                marks[(job.session, job.created)] = max(marks.get((job.session, job.created), 0), job.mark)
        records += [Record(MARK_KIND, MARK_KEY, {"next": mark, "created": created}, sid) for (sid, created), mark in marks.items()]
        await self._write(tenant, records)
        if self.on_marked is not None and marks:
            await self.on_marked(state, {sid: mark for (sid, _), mark in marks.items() if sid is not None})
        gone = await self._gone(tenant, sessions)
        if gone:  # deleted while we embedded: take back what we wrote for it
            await self.store.apply([Write(tenant, records=[Record(r.kind, r.key, None, r.session_id) for r in records
                                                           if r.session_id is not None and any(r.session_id == g[0] for g in gone)])])
            memories = _alive(memories, gone)
        new = [m for m in memories if m.id not in mem.ids]
        forgotten = state.sessions_forgotten
        for start in range(0, len(new), _INSERT_SLICE):
            if state.sessions_forgotten != forgotten:  # a session was erased while we yielded
                forgotten = state.sessions_forgotten
                gone = await self._gone(tenant, sessions)
                new = new[:start] + _alive(new[start:], gone)
                memories = _alive(memories, gone)
            # Tokenizing and indexing run on the loop: in slices, never one long stall for the
            # requests.
            state.insert(new[start:start + _INSERT_SLICE])
            await asyncio.sleep(0)
        state.attach_vectors(memories)  # re-embedded ones (new ones were inserted with their vectors)
        state.counters["indexed"] += len(new)

    async def _gone(self, tenant: str, sessions: set[_Incarnation]) -> set[_Incarnation]:
        gone = set()
        for sid, created in sessions:
            if sid is None:
                continue
            found = await self.store.get_session(tenant, sid)
            # A brand-new session may not be flushed yet when written behind; the write-behind
            # overlay answers for it, so None really means deleted.
            if found is None or found.created_at != created:
                gone.add((sid, created))
        return gone

    async def _write(self, tenant: str, records: list[Record]) -> None:
        if not records:
            return
        # Routine: a lost memory record is rebuilt from the transcript (the mark).
        await self.store.apply([Write(tenant, records=records)], durable=False)


def _alive(memories: list[Memory], gone: set[_Incarnation]) -> list[Memory]:
    return [m for m in memories if m.session is None or (m.session, m.session_created) not in gone]


def episodic(tenant: str, session: str, created: float, user: str | None, message: Message, parent: Message | None = None) -> Memory | None:
    """The episodic memory of a recorded message, with the end of the one it answered as context."""
    if message.role not in ("user", "assistant") or message.reverted:
        return None
    if message.role == "assistant" and message.outcome == "error":
        return None
    text = message_text(message.body)
    if not text:
        return None
    name = message.body.get("name") if isinstance(message.body.get("name"), str) else None
    context = None
    if parent is not None and parent.role in ("user", "assistant"):
        previous = message_text(parent.body)
        if previous:
            context = previous if len(previous) <= _CONTEXT_CHARS else "…" + previous[-_CONTEXT_CHARS:]
            if isinstance(parent.body.get("name"), str):
                context = f"{parent.body['name']}: {context}"
    return Memory(id=episodic_id(tenant, session, created, message.seq), type=EPISODIC, text=text[:MAX_TEXT], ts=message.ts,
                  key=-1, user=user, session=session, session_created=created, seq=message.seq, role=message.role, name=name,
                  context=context)
