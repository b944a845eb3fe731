"""Background extraction of facts, preferences, commitments and lessons from recorded turns,
never on the request path.

``after_record`` schedules a session; once it has been quiet for ``delay`` seconds the worker
reads its messages since the session's extraction mark, asks the tenant's
``memory.extractor_model`` for memories (proxy/memory/extract_llm.py) or, without one, applies
the rules (proxy/memory/extract_rules.py), and hands the candidates to the store side
(proxy/memory/supersede.py). A failed extraction (upstream error, a reply that is not the JSON
asked for) is logged and retried with backoff up to ``attempts`` times, then the rules stand in.
Each run leaves a ``memory_extraction`` record in the session (what it produced, merged and
superseded) and advances the session's ``memory_extract_mark``: both are erased with the session.

A run holds the session's extraction claim (proxy/jobs.py): the live worker here and the
backfill of older sessions (proxy/memory/backfill.py) never run one session at once, in this
process or, in fleet mode, across replicas; each reads the mark afresh once it holds the claim.
Turns of a user recorded before that user's memories were erased are never learned from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from proxy.jobs import Claims
from proxy.lifecycle import same_session
from proxy.memory import expiry, extract_llm
from proxy.memory.extract_rules import Candidate, from_rules
from proxy.memory.model import Memory
from proxy.memory.supersede import Consolidator, Outcome
from proxy.memory.tenant import TenantMemory, index_text
from proxy.records import Message
from proxy.storage.base import Record, Write

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService

log = logging.getLogger("agent_state_proxy.memory.extraction")

MARK_KIND, MARK_KEY = "memory_extract_mark", "next"  # session-scoped: messages below "next" were extracted
LOG_KIND = "memory_extraction"  # session-scoped: one record per run
RULES = "rules"
_CONTEXT = 6  # messages before the new ones the extractor sees (a fix answers an earlier failure)
_WINDOW = 200  # new messages handed to one run at most
_KNOWN_READS = 200  # of the user's newest non-episodic memories read for the ones extracted
_BUSY_RETRY = 1.0  # seconds before a session another runner is extracting is tried again
DONE, RETRY, BUSY = "done", "retry", "busy"  # how a claimed run ended (busy: another runner has the session)


@dataclass
class Pending:
    tenant: str
    session: str
    created: float
    user: str | None
    due: float  # time.monotonic() when it may run
    attempts: int = 0
    more: bool = False  # the last run stopped at _WINDOW messages: more are waiting
    read: int = 0  # messages the runs so far read past the mark (0: another runner had read them)


class ServiceHost:
    """The memory service's tenants as supersede.Host sees them."""

    def __init__(self, service: MemoryService) -> None:
        self.tenants = service.tenants
        self.store = service.store

    def memory(self, tenant: str) -> TenantMemory:
        return self.tenants[tenant].memory

    async def embed(self, tenant: str, text: str) -> tuple[np.ndarray | None, str | None]:
        state = self.tenants[tenant]
        batcher = state.embedder.index
        if batcher is None:
            return None, None  # stored lexically; the indexer embeds it once the embedder is up
        try:
            probe = Memory(id="", type="semantic", text=text, ts=0.0, key=-1)
            return await asyncio.wait_for(batcher.embed(index_text(probe)[:4000]), 30), state.model_name
        except Exception as exc:  # noqa: BLE001 - stored lexically, re-embedded later
            state.counters["embedder_errors"] += 1
            log.warning("memory: embedding an extracted memory of tenant %s failed: %s", tenant, exc)
            return None, None

    def allocate_key(self, tenant: str) -> int:
        return self.tenants[tenant].allocate_key()

    def insert(self, tenant: str, memories: list[Memory]) -> None:
        self.tenants[tenant].insert(memories)

    def forget(self, tenant: str, ids: list[str]) -> None:
        self.tenants[tenant].forget(ids)


class Extractor:
    def __init__(self, service: MemoryService, claims: Claims, *, delay: float = 2.0, retry_base: float = 2.0,
                 attempts: int = 3) -> None:
        self.service = service
        self.claims = claims
        self.host = ServiceHost(service)
        self.consolidator = Consolidator(self.host)
        self.delay, self.retry_base, self.attempts = delay, retry_base, attempts
        self._pending: dict[tuple[str, str, float], Pending] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._catch_up: asyncio.Task[None] | None = None

    def enabled(self, tenant: str) -> bool:
        settings = self.service.settings.get(tenant)
        return settings is not None and settings.extract

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self, turn: Any, messages: list[Message]) -> None:
        """After a turn was recorded: extract from its session once it has been quiet a while."""
        tenant = turn.tenant.name
        if not messages or not self.enabled(tenant):
            return
        session = turn.session
        user = self.service.tenants[tenant].user(turn.ref.user_id or session.user_id)
        key = (tenant, session.id, session.created_at)
        pending = self._pending.get(key)
        due = time.monotonic() + self.delay
        if pending is None:
            self._pending[key] = Pending(tenant, session.id, session.created_at, user, due)
        elif pending.attempts == 0:
            pending.due = due  # debounce: one run for a burst of turns
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None and any(s.extract for s in self.service.settings.values()):
            self._task = asyncio.create_task(self._run(), name="memory-extractor")
            self._catch_up = asyncio.create_task(self.catch_up(), name="memory-extractor-catch-up")

    async def close(self) -> None:
        for task in (self._catch_up, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def catch_up(self) -> None:
        """At start: schedule the sessions recorded past their extraction mark while the proxy
        stopped (or crashed) before extracting. Sessions never extracted have no mark: the
        backfill (proxy/memory/backfill.py) takes those."""
        for tenant, state in list(self.service.tenants.items()):
            if not state.settings.extract:
                continue
            await state.ready.wait()
            try:
                for session in await self.service.store.list_sessions(tenant):
                    mark = await self.service.store.get_record(tenant, MARK_KIND, MARK_KEY, session.id)
                    if mark and mark.get("created") == session.created_at and int(mark.get("next", 0)) < session.next_seq:
                        key = (tenant, session.id, session.created_at)
                        self._pending.setdefault(key, Pending(tenant, session.id, session.created_at,
                                                               state.user(session.user_id), time.monotonic() + self.delay))
                        self._idle.clear()
                        self._wake.set()
                    await asyncio.sleep(0)  # store reads do not suspend: let requests in
            except Exception:
                log.exception("memory: the extraction catch-up of tenant %s failed", tenant)

    def scheduled(self, tenant: str, session: str, created: float) -> bool:
        """Whether the live worker will extract this session (the backfill leaves it alone)."""
        return (tenant, session, created) in self._pending

    async def drain(self) -> None:
        """Run every scheduled extraction now (tests, benchmarks) and wait until none is left."""
        for pending in self._pending.values():
            pending.due = min(pending.due, time.monotonic()) if pending.attempts == 0 else pending.due
        self._wake.set()
        await self._idle.wait()

    # -- the worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            due = [p for p in self._pending.values() if p.due <= now]
            if not due:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(p.due for p in self._pending.values()) - now)
                continue
            for pending in due:
                key = (pending.tenant, pending.session, pending.created)
                try:
                    ended = await self.run_claimed(pending)
                except Exception:  # never kill the worker: log, count, move on
                    log.exception("memory: extraction for a session of tenant %s failed", pending.tenant)
                    self.service.tenants[pending.tenant].counters["extract_errors"] += 1
                    ended, pending.more = DONE, False
                if ended == BUSY or (ended == DONE and pending.more):  # another runner has it, or more to read
                    pending.due = time.monotonic() + (_BUSY_RETRY if ended == BUSY else 0.0)
                    pending.attempts = 0 if ended == DONE else pending.attempts
                    continue
                done = ended == DONE
                if done and self._pending.get(key) is pending and pending.due <= time.monotonic():
                    del self._pending[key]  # (rescheduled meanwhile: a newer turn runs again later)
                elif done and self._pending.get(key) is pending:
                    pending.attempts = 0

    async def run_claimed(self, pending: Pending) -> str:
        """One run for a session while holding its extraction claim: DONE, RETRY (failed, retry
        at ``pending.due``) or BUSY (another runner holds the session: nothing was done)."""
        async with self.claims.claim(f"memory-extract:{pending.tenant}\0{pending.session}") as granted:
            if not granted:
                return BUSY
            return DONE if await self._extract(pending) else RETRY

    async def _extract(self, pending: Pending) -> bool:
        """One run for a session; False when it failed and will be retried."""
        service, tenant = self.service, pending.tenant
        state = service.tenants[tenant]
        await state.ready.wait()
        store = service.store
        pending.more = False
        session = await store.get_session(tenant, pending.session)
        if session is None or session.created_at != pending.created:
            return True  # erased meanwhile: nothing to extract from
        mark = await store.get_record(tenant, MARK_KIND, MARK_KEY, pending.session)
        marked = bool(mark) and mark.get("created") == pending.created
        start = int(mark["next"]) if marked else 0
        messages = [m for m in await store.get_messages(tenant, pending.session) if not m.reverted]
        rest = [m for m in messages if m.seq >= start]
        new, pending.more = rest[:_WINDOW], len(rest) > _WINDOW
        pending.read += len(new)
        if not new:
            if not marked:  # nothing to read (all rolled back): marked, so the backfill does not come back
                await store.apply([Write(tenant, records=[Record(MARK_KIND, MARK_KEY, {"next": session.next_seq, "created": pending.created},
                                                                 pending.session)])])
            return True
        seqs = [m.seq for m in new]  # what the run reads: the mark moves past them
        # Turns recorded before their user's memories were erased are not learned from (the
        # backfill of old sessions would bring back what the erasure took).
        erased = await expiry.user_erased_at(store, tenant, pending.user)
        new = [m for m in new if m.ts > erased]
        earlier = [m for m in messages if m.seq < seqs[0] and m.ts > erased][-_CONTEXT:]
        window, learned = earlier + new, [m.seq for m in new]
        settings = state.settings
        by, error, attempts = settings.extractor_model or RULES, None, pending.attempts + 1
        if not new:
            by, candidates = RULES, []  # nothing to learn from: no call
        elif settings.extractor_model:
            try:
                candidates = await self._ask_model(pending, settings.extractor_model, window, learned)
            except Exception as exc:  # noqa: BLE001 - an upstream error or a bad reply: retry, then rules
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
                state.counters["extract_failures"] += 1
                pending.attempts += 1
                if pending.attempts < self.attempts:
                    pending.due = time.monotonic() + self.retry_base * 2 ** (pending.attempts - 1)
                    log.warning("memory: extractor %s failed for tenant %s (%s); retry %d of %d", by, tenant, error,
                                pending.attempts, self.attempts - 1)
                    return False
                log.warning("memory: extractor %s failed for tenant %s (%s) %d times; rules instead", by, tenant, error, pending.attempts)
                by, candidates, attempts = RULES, from_rules(new, earlier), pending.attempts
        else:
            candidates = from_rules(new, earlier)
        stated = {m.seq: m.ts for m in new}
        candidates = [_within(c, learned, stated) for c in candidates]
        # Checked again after the model call: an erasure meanwhile leaves nothing to write.
        if not same_session(await store.get_session(tenant, pending.session), pending.created):
            return True
        erased = await expiry.user_erased_at(store, tenant, pending.user)
        candidates = [c for c in candidates if c.stated is None or c.stated > erased]
        outcome = await self.consolidator.apply(tenant, pending.user, pending.session, pending.created, by, candidates,
                                                state.config.quotas.memories)
        await self._finish(pending, by, seqs, outcome, error, attempts, erased)
        state.counters["extract_runs"] += 1
        state.counters["extracted"] += len(outcome.added)
        state.counters["extract_merged"] += len(outcome.merged)
        state.counters["superseded"] += len(outcome.superseded)
        return True

    async def _ask_model(self, pending: Pending, alias: str, window: list[Message], seqs: list[int]) -> list[Candidate]:
        service, tenant = self.service, pending.tenant
        config = service.tenants[tenant].config
        route = config.route(alias)
        if route is None:
            raise extract_llm.BadReply(f"no route for the model alias {alias!r}")
        known = await self._known(tenant, pending.user)
        timeout = min(config.upstream_timeout, 120.0)
        try:
            response = await asyncio.wait_for(service.upstream.complete(route, extract_llm.request(alias, window, known), timeout), timeout)
        except asyncio.TimeoutError:  # (its message is empty: the run's error would say only "TimeoutError: ")
            raise extract_llm.BadReply(f"no reply within {timeout:.0f} s") from None
        return extract_llm.parse(response, seqs)

    async def _known(self, tenant: str, user: str | None) -> list[Memory]:
        """The user's current extracted memories, newest first (the model may say one is replaced)."""
        mem = self.service.tenants[tenant].memory
        if user is None:
            return []
        code = mem.user_code(user)
        cols = mem.cols
        slots = np.flatnonzero((cols.alive[: len(mem.ids)]) & (cols.user[: len(mem.ids)] == code) & (cols.seq[: len(mem.ids)] < 0))
        found: list[Memory] = []
        for slot in slots[::-1][:_KNOWN_READS].tolist():
            read = await self.consolidator.read(tenant, mem.ids[slot] or "")
            if read is not None and read[0].extracted:
                found.append(read[0])
            if len(found) >= 30:
                break
        return found

    async def _finish(self, pending: Pending, by: str, seqs: list[int], outcome: Outcome, error: str | None, attempts: int,
                      erased: float) -> None:
        """The run's log and the session's new mark, in one transaction; taken back when the
        session was erased meanwhile (what was added, when its user was)."""
        tenant, sid = pending.tenant, pending.session
        entry = {"by": by, "seqs": seqs, "at": time.time(), "attempts": attempts, "error": error} | outcome.log()
        records = [Record(LOG_KIND, f"{seqs[0]:010d}-{seqs[-1]:010d}-{int(time.time() * 1000):013d}", entry, sid),
                   Record(MARK_KIND, MARK_KEY, {"next": seqs[-1] + 1, "created": pending.created}, sid)]
        store = self.service.store
        await store.apply([Write(tenant, records=records)])
        session = await store.get_session(tenant, sid)
        if session is None or session.created_at != pending.created:  # what was written for it goes too
            await self.service.forget_session(tenant, sid)
            undo = [Record(r.kind, r.key, None, sid) for r in records]
            undo += [r for memory_id in outcome.added for r in Memory.erasure(memory_id, sid)]
            await store.apply([Write(tenant, records=undo)])
        elif outcome.added and await expiry.user_erased_at(store, tenant, pending.user) > erased:
            await store.apply([Write(tenant, records=[r for memory_id in outcome.added for r in Memory.erasure(memory_id, sid)])])
            self.host.forget(tenant, outcome.added)


def _within(candidate: Candidate, seqs: list[int], stated: dict[int, float]) -> Candidate:
    """Provenance only from this run's messages (context messages were extracted before), and
    the time it was stated: that of its newest message (of the run's newest without any)."""
    kept = [s for s in candidate.seqs if s in seqs] or candidate.seqs
    candidate.seqs = kept
    candidate.stated = max((stated[s] for s in kept if s in stated), default=stated[seqs[-1]])
    return candidate
