"""The chat request pipeline: identify → load → recall and shape the context → call upstream → record.

Each stage lives in its own module (``proxy/stages``, ``proxy/context/manager.py``); this one puts
them in order, so the whole flow of a request reads top to bottom in ``Pipeline.prepare`` and
``Pipeline.complete``/``stream``. A stage reads the turn and returns what it decided; ``_decided``
is the one place those results become the upstream body, the response headers and the session's
statistics. The pipeline works on the canonical chat turn (``proxy/turn.py``); a client protocol's
wire format stays at the edge (``proxy/protocols``, ``proxy/server``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping

from proxy import priority, transcript
from proxy.context.manager import ContextManager, Shaped
from proxy.errors import ProxyError
from proxy.lifecycle import SessionLifecycle
from proxy.observe import Observer
from proxy.protocols.chat import CHAT
from proxy.records import Message, Session
from proxy.sessions import SessionLocks, SessionRef, strip_proxy_fields
from proxy.stages import identify as identifying, recall as recalling, replay as replays
from proxy.stages.load import SessionLoader
from proxy.stages.reconcile import History, reconcile
from proxy.stages.record import Answer, record
from proxy.stages.replay import request_fingerprint  # noqa: F401  (the benchmarks import it from here)
from proxy.storage.base import Store
from proxy.turn import Exchange, Turn
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.config import ResolvedModel, TenantConfig
    from proxy.memory.service import MemoryService


class Pipeline:
    def __init__(self, store: Store, upstream: Upstream, clock: Callable[[], float] = time.time, context: ContextManager | None = None) -> None:
        self.store = store
        self.upstream = upstream
        self.context = context  # fits what goes upstream to the model's token budget
        self.lifecycle = SessionLifecycle(store, context)  # locks, expiry, deletion, rollback, fork
        self.loader = SessionLoader(store, self.lifecycle)
        self.clock = clock
        self.observer = Observer()  # stage timings and counts; the app sets its metrics here

    @property
    def memory(self) -> MemoryService | None:
        """Long-term memory, set by the app when enabled (the lifecycle forgets with it)."""
        return self.lifecycle.memory

    @memory.setter
    def memory(self, service: MemoryService | None) -> None:
        self.lifecycle.memory = service

    @property
    def locks(self) -> SessionLocks:
        return self.lifecycle.locks

    @property
    def repaired(self) -> list[dict[str, Any]]:
        """The sessions repaired at load since start (the newest), for the admin API."""
        return list(self.loader.repaired)

    def session_lock(self, tenant: TenantConfig, ref: SessionRef):
        return self.lifecycle.hold(tenant.name, ref.id, refuse_when_busy=tenant.concurrency == "reject")

    def hold(self, tenant: str, session_id: str, refuse_when_busy: bool):
        return self.lifecycle.hold(tenant, session_id, refuse_when_busy)

    def identify(self, tenant: TenantConfig, headers: Mapping[str, str], path_session: str | None, body: Any) -> tuple[SessionRef, dict[str, Any], ResolvedModel]:
        with self._stage(tenant, "identify"):
            return identifying.identify(tenant, headers, path_session, body)

    async def resume(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any]) -> SessionRef:
        """The session an agent that restarted without its history continues (before locking)."""
        return await identifying.resume(self.store, self.clock, tenant, ref, body)

    async def prepare(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any], route: ResolvedModel, idempotency_key: str | None = None,
                      exchange: Exchange | None = None) -> Turn:
        """Load the session (call under the session lock) and decide what goes upstream."""
        now = self.clock()
        if tenant.stateless:
            session = Session(tenant=tenant.name, id=ref.id, created_at=now, last_active=now)
            plan = transcript.Plan(body["messages"], [], None)
            return Turn(tenant, ref, route, strip_proxy_fields(body), session, [], plan, "req-" + uuid.uuid4().hex, now,
                        headers={"X-Session-ID": ref.id}, exchange=exchange)
        # The query embedding (the slowest step of the request) starts before anything else.
        early = self.memory.embed_query(tenant.name, body) if self.memory is not None else None
        try:
            with self._stage(tenant, "load"):
                session, stored = await self._load(tenant, ref, now)
            idempotency = await replays.find(self.store, tenant.name, ref.id, idempotency_key, body)
            if idempotency is not None and idempotency.recorded is not None:  # a client retry: the recorded answer
                if early is not None:
                    early.cancel()
                return _replayed(tenant, ref, route, body, session, stored, now, idempotency, exchange)
            with self._stage(tenant, "reconcile"):
                history = reconcile(tenant, session, stored, body)
            turn = _new_turn(tenant, ref, route, body, session, stored, now, history, idempotency, exchange)
            with priority.requests.request():  # background indexing yields the CPU meanwhile
                # The query embedding runs on the embedder's thread while the context is shaped,
                # which keeps the memory block's tokens free.
                started = recalling.begin(self.memory, turn, early) if self.memory is not None else recalling.Started(None, {})
                try:
                    shaped = Shaped(turn.body, started.reserve)
                    if self.context is not None:
                        with self._stage(tenant, "context"):
                            shaped = await self.context.shape(turn, reserve=started.reserve)
                    memories = recalling.Memories(headers=started.headers)
                    if self.memory is not None and started.recall is not None:
                        with self._stage(tenant, "recall"):  # memories before the newest user message
                            memories = await recalling.finish(self.memory, turn, started, shaped.body, shaped.recalled, room=shaped.kept_free)
                finally:
                    started.cancel()  # a no-op once finished; if shaping failed, drops the embedding
            if memories.searched_seconds is not None:  # the whole recall, its query embedding included
                self.observer.recalled(tenant.name, memories.searched_seconds, memories.missed_budget)
            return _decided(turn, shaped, memories)
        except BaseException:
            if early is not None:
                early.cancel()
            raise

    async def _load(self, tenant: TenantConfig, ref: SessionRef, now: float) -> tuple[Session, list[Message]]:
        return await self.loader.load(tenant, ref, now)

    async def complete(self, turn: Turn) -> dict[str, Any]:
        """Call the upstream for the whole answer; record it (or the failure)."""
        exchange = turn.exchange or CHAT
        started = time.perf_counter()
        try:
            with self._stage(turn.tenant, "upstream"):
                response = await exchange.complete(self.upstream, turn)
        except ProxyError as error:
            self._upstream_failed(turn, error)
            turn.upstream_ms = (time.perf_counter() - started) * 1000
            await self._record(turn, Answer([], "error"))
            raise
        turn.upstream_ms, turn.upstream_status = (time.perf_counter() - started) * 1000, 200
        assistant, finish, usage, model = exchange.reply(response)
        await self._record(turn, Answer(assistant, "ok", finish, usage, model, response=response))
        return response

    async def stream(self, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        """Relay the provider's chunks (in the batches they arrived in); record the response when
        the stream ends, however it ends."""
        exchange = turn.exchange or CHAT
        collected = exchange.collector(turn.idempotency_key is not None)
        outcome = "aborted"
        started = time.perf_counter()
        try:
            # aclosing: a client that goes away closes this generator, which must close the
            # provider's stream (and its connection) now, not whenever it is garbage-collected.
            with self._stage(turn.tenant, "upstream"):  # to the stream's end
                async with contextlib.aclosing(exchange.stream(self.upstream, turn)) as chunks:
                    async for batch in chunks:
                        for chunk in batch:
                            collected.add(chunk)
                        yield batch
            outcome = "ok"
            turn.upstream_status = 200
        except ProxyError as error:
            outcome = "error"
            self._upstream_failed(turn, error)
            raise
        except Exception:  # something here failed, not the provider: still never "aborted"
            outcome = "error"
            raise
        finally:
            turn.upstream_ms = (time.perf_counter() - started) * 1000
            # Runs on success, on failure and when the client disconnects (the generator is
            # closed: GeneratorExit), so a partial answer is kept with its outcome.
            await self._record(turn, Answer(collected.messages(), outcome, collected.finish_reason(), collected.usage, collected.model,
                                            chunks=collected.chunks if outcome == "ok" else None))

    def _upstream_failed(self, turn: Turn, error: ProxyError) -> None:
        self.observer.upstream_failed(turn.tenant.name, turn.route.model, error.status)
        turn.upstream_status = getattr(error, "provider_status", None)

    async def _record(self, turn: Turn, answer: Answer) -> None:
        """Record the turn; then the background work on it (summaries, memory indexing) is queued."""
        usage = answer.usage if isinstance(answer.usage, dict) else None
        turn.usage = usage
        saved = int(turn.headers.get("X-Context-Tokens-Saved") or 0)
        self.observer.recorded(turn.tenant.name, turn.ref.id, usage, saved)
        if turn.tenant.stateless:
            return
        with self._stage(turn.tenant, "record"):
            records, headers = await record(self.store, turn, answer, self.clock())
            turn.headers |= headers
            if self.context is not None:
                self.context.after_record(turn, records)  # background summaries, off the request path
            if self.memory is not None:
                await self.memory.after_record(turn, records)  # background indexing, off the request path

    def _stage(self, tenant: TenantConfig, name: str) -> _Stage:
        return _Stage(self.observer, tenant.name, name)


def _new_turn(tenant: TenantConfig, ref: SessionRef, route: ResolvedModel, body: dict[str, Any], session: Session, stored: list[Message],
              now: float, history: History, idempotency: replays.Idempotency | None, exchange: Exchange | None) -> Turn:
    """The turn as reconciled: the client's body (with the history it left out) and its headers."""
    upstream_body = strip_proxy_fields(body)
    if history.messages is not None:
        upstream_body = upstream_body | {"messages": history.messages}
    turn = Turn(tenant, ref, route, upstream_body, session, stored, history.plan, "req-" + uuid.uuid4().hex, now,
                idempotency_key=idempotency.key if idempotency else None, fingerprint=idempotency.fingerprint if idempotency else None,
                exchange=exchange)
    turn.headers = {"X-Session-ID": ref.id, "X-Request-ID": turn.request_id, "X-Session-Source": ref.source} | history.headers
    return turn


def _replayed(tenant: TenantConfig, ref: SessionRef, route: ResolvedModel, body: dict[str, Any], session: Session, stored: list[Message],
              now: float, idempotency: replays.Idempotency, exchange: Exchange | None) -> Turn:
    """A retried request's turn: the recorded answer goes back, nothing is called or recorded."""
    recorded = idempotency.recorded or {}
    plan = transcript.Plan(body["messages"], [], None, replayed=True)
    headers = {"X-Session-ID": ref.id, "X-Request-ID": recorded["request_id"], "Idempotent-Replayed": "true"}
    return Turn(tenant, ref, route, body, session, stored, plan, recorded["request_id"], now, headers, idempotency.key, recorded,
                exchange=exchange)


def _decided(turn: Turn, shaped: Shaped, memories: recalling.Memories) -> Turn:
    """The one place a turn takes what its stages decided: the upstream body (shaped, with the
    memory block), the response headers, the memories to record and the session's statistics."""
    turn.body = memories.body if memories.body is not None else shaped.body
    turn.recalled = shaped.recalled
    turn.injected = memories.ids
    turn.headers |= shaped.headers | memories.headers
    if shaped.stats is not None:
        turn.session.extra["context"] = shaped.stats
    return turn


class _Stage:
    """Times one stage of a request for the observer (the metrics' per-stage histogram). A
    class, not @contextmanager: seven of these run per request, and the generator-based one
    took 2.5 times as long (timeit, 3.0 vs 7.7 µs on a busy 2-core machine)."""

    __slots__ = ("observer", "tenant", "name", "began")

    def __init__(self, observer: Observer, tenant: str, name: str) -> None:
        self.observer, self.tenant, self.name = observer, tenant, name

    def __enter__(self) -> None:
        self.began = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.observer.stage(self.tenant, self.name, time.perf_counter() - self.began)
