"""Backfill: extract the sessions a tenant recorded before extraction was turned on for it.

The live worker (extraction.py) extracts the turns recorded while extraction is on, and at start
the sessions recorded past their extraction mark. A session with recorded turns but no mark at
all was recorded while extraction was off; once it is on (at start, or a configuration reload
turns it on) this takes those sessions, one tenant task each, in the background:

* **oldest first** (by creation time): supersession is temporal, so facts are applied in the
  order they were stated and the newest statement of a subject ends up current; stopped half
  way, what was learned is the oldest part of the history, which newer live turns then correct.
* **bounded**: at most ``memory.backfill_per_minute`` runs (each one extractor call, up to 200
  messages) per tenant, one at a time, each after a quiet moment of the proxy (no request in
  flight, ``priority.activity``), so a long history neither starves requests nor floods the
  extractor model;
* **once**: each run holds the session's extraction claim (proxy/jobs.py: across a fleet, one
  replica) and reads the mark afresh, so a session the live worker, another replica or a run
  before a restart extracted is not read again; a restart resumes with the sessions still
  without a mark (a session stopped half way has one: the start-up catch-up finishes it);
* **erasure and TTL**: a run re-checks that the session still lives before writing (extraction.py),
  and expired sessions are skipped (the janitor deletes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from proxy import priority
from proxy.lifecycle import is_expired, same_session
from proxy.memory.extraction import BUSY, MARK_KEY, MARK_KIND, RETRY, Pending
from proxy.memory.state import TenantState
from proxy.records import Session

if TYPE_CHECKING:
    from proxy.memory.extraction import Extractor

log = logging.getLogger("agent_state_proxy.memory.backfill")

QUIET_SECONDS = 0.2  # a run starts once no request has been in flight this long...
QUIET_WITHIN = 5.0  # ...or after this long regardless (a proxy that is never quiet still backfills)
STOP_WAIT = 10.0  # at shutdown, seconds a run in progress has to finish (then it is cancelled: repeated at the next start)


@dataclass
class Progress:
    """One tenant's backfill, for /admin/memory and the metrics."""

    state: str = "scanning"  # scanning | running | done | stopped (extraction turned off)
    pending: int = 0  # sessions found without a mark, not taken yet
    done: int = 0  # sessions extracted by this replica
    skipped: int = 0  # extracted meanwhile by another runner, or erased or expired first
    runs: int = 0  # extraction runs (extractor calls, with a model) made
    started_at: float = 0.0
    finished_at: float | None = None


class Backfill:
    def __init__(self, extractor: Extractor) -> None:
        self.extractor = extractor
        self.service = extractor.service
        self.progress: dict[str, Progress] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_run: set[str] = set()  # tenants whose backfill is in a run (not waiting for its turn)
        self._stopping = False

    def start(self, tenant: str) -> None:
        """Backfill the tenant's sessions without a mark, unless that runs already or is off."""
        state = self.service.tenants.get(tenant)
        if state is None or not _on(state) or self._stopping:
            return
        task = self._tasks.get(tenant)
        if task is None or task.done():
            self._tasks[tenant] = asyncio.create_task(self._tenant(state), name=f"memory-backfill-{tenant}")

    async def close(self) -> None:
        """Stop: a backfill waiting for its next run stops at once, one in a run finishes it
        (within STOP_WAIT), so a shutdown rarely leaves a run's memories without its mark."""
        self._stopping = True
        for tenant, task in self._tasks.items():
            if tenant not in self._in_run:
                task.cancel()
        running = [task for task in self._tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running, timeout=STOP_WAIT)
        for task in self._tasks.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drain(self) -> None:
        """Wait until every tenant's backfill is over (tests, benchmarks)."""
        while any(not t.done() for t in self._tasks.values()):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def stats(self, tenant: str) -> dict[str, Any] | None:
        progress = self.progress.get(tenant)
        return None if progress is None else asdict(progress)

    def sessions(self) -> dict[str, tuple[int, int, int]]:
        """(pending, done, skipped) sessions of each tenant's backfill so far (the metrics)."""
        return {tenant: (p.pending, p.done, p.skipped) for tenant, p in self.progress.items()}

    # -- one tenant ----------------------------------------------------------------------------

    async def _tenant(self, state: TenantState) -> None:
        progress = self.progress[state.name] = Progress(started_at=time.time())
        try:
            await state.ready.wait()
            sessions = await self._unmarked(state)
            progress.state, progress.pending = "running", len(sessions)
            if sessions:
                log.info("memory: backfilling %d sessions of tenant %s recorded before extraction was on, oldest first, "
                         "at most %d runs a minute", len(sessions), state.name, state.settings.backfill_per_minute)
            pace = _Pace()
            for session in sessions:
                if not _on(state) or self._stopping:
                    return  # (stopped: turned off by a reload, or shutting down)
                try:
                    extracted = await self._session(state, session, pace, progress)
                except Exception:  # one session's failure does not stop the rest
                    log.exception("memory: backfilling a session of tenant %s failed", state.name)
                    state.counters["extract_errors"] += 1
                    extracted = False
                if self._stopping:
                    return
                progress.pending -= 1
                if extracted:
                    progress.done += 1
                else:
                    progress.skipped += 1
            progress.state = "done"
            if sessions:
                log.info("memory: backfill of tenant %s done: %d sessions extracted, %d skipped, %d runs", state.name,
                         progress.done, progress.skipped, progress.runs)
        finally:
            if progress.state in ("scanning", "running"):
                progress.state = "stopped"
            progress.finished_at = time.time()

    async def _unmarked(self, state: TenantState) -> list[Session]:
        """The tenant's live sessions with recorded turns and no extraction mark, oldest first."""
        store, now, found = self.service.store, time.time(), []
        for count, session in enumerate(await store.list_sessions(state.name)):
            if session.next_seq > 0 and not is_expired(state.config, session, now) \
                    and not self.extractor.scheduled(state.name, session.id, session.created_at):
                mark = await store.get_record(state.name, MARK_KIND, MARK_KEY, session.id)
                if not mark or mark.get("created") != session.created_at:
                    found.append(session)
            if count % 64 == 63:
                await asyncio.sleep(0)  # store reads do not always suspend: let requests in
        found.sort(key=lambda s: (s.created_at, s.id))
        return found

    async def _session(self, state: TenantState, session: Session, pace: _Pace, progress: Progress) -> bool:
        """Extract one session to its end, run by run; False when it was not this runner's to do."""
        store = self.service.store
        pending = Pending(state.name, session.id, session.created_at, state.user(session.user_id), 0.0)
        while True:
            if not _on(state) or self._stopping:
                return False
            await pace.wait(60.0 / state.settings.backfill_per_minute)
            await priority.activity.quiet(QUIET_SECONDS, within=QUIET_WITHIN)
            current = await store.get_session(state.name, session.id)
            if not same_session(current, session.created_at) or is_expired(state.config, current, time.time()):
                return False  # erased or expired meanwhile
            read = pending.read
            self._in_run.add(state.name)
            try:
                ended = await self.extractor.run_claimed(pending)
            finally:
                self._in_run.discard(state.name)
            if ended == BUSY:
                return False  # the live worker or another replica has it (and reads the mark afresh)
            if pending.read > read:
                progress.runs += 1
                state.counters["backfill_runs"] += 1
            if ended == RETRY:
                await asyncio.sleep(max(0.0, pending.due - time.monotonic()))
            elif not pending.more:
                return pending.read > 0  # 0: extracted meanwhile by a runner that had claimed it first


class _Pace:
    """Runs spaced at least ``interval`` seconds apart (the interval is read at each run: a reload
    may change the rate)."""

    def __init__(self) -> None:
        self._last: float | None = None

    async def wait(self, interval: float) -> None:
        if self._last is not None:
            await asyncio.sleep(max(0.0, self._last + interval - time.monotonic()))
        self._last = time.monotonic()


def _on(state: TenantState) -> bool:
    return state.settings.extract and state.settings.backfill_per_minute > 0
