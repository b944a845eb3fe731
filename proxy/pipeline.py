"""The chat request pipeline: identify → load state → reconcile history → call upstream → record.

Each stage lives in its own module; this one puts them in order, so the whole flow of a
request reads top to bottom in ``Pipeline.prepare`` and ``Pipeline.complete``/``stream``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Protocol

import orjson

from proxy import checkpoints, codec, priority, tokens, transcript
from proxy.config import ResolvedModel, TenantConfig
from proxy.context import caching
from proxy.context.importance import tag_message
from proxy.context.manager import ContextManager
from proxy.errors import BadRequest, Conflict, NotFound, ProxyError, UpstreamError
from proxy.observe import Observer
from proxy.pacing import Pace
from proxy.records import Message, Session
from proxy.sessions import SessionLocks, SessionRef, agent_identity, identify, strip_proxy_fields
from proxy.storage.base import InvalidWrite, Record, SessionBusy, StorageError, Store, Write
from proxy.upstream import Upstream
from proxy.validate import chat_body

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService, QueryEmbedding

log = logging.getLogger("agent_state_proxy.pipeline")
IDEMPOTENCY_KIND = "idempotency"
AGENT_KIND = "agent"  # tenant-wide: an agent identity's latest implicit session (sessions.implicit: resume)
VERIFIED_SESSIONS = 100_000  # sessions remembered as chain-checked (~150 bytes each)


class Exchange(Protocol):
    """How a turn of a client protocol other than Chat Completions reaches the upstream and is read
    back for the record (edge adapters in proxy/protocols implement it; None means Chat Completions)."""

    async def complete(self, upstream: Upstream, turn: Turn) -> dict[str, Any]:
        """The answer, in the client's protocol."""

    def reply(self, response: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None, str | None]:
        """From an answer: the assistant messages to record, finish reason, usage (prompt_tokens /
        completion_tokens) and model."""

    def stream(self, upstream: Upstream, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        """The answer's stream events, in the client's protocol, in batches."""

    def collector(self, keep_chunks: bool) -> Any:
        """What rebuilds the answer from the stream: add(event), messages(), finish_reason(), usage, model, chunks."""


@dataclass
class Turn:
    """Everything one chat request carries through the pipeline."""

    tenant: TenantConfig
    ref: SessionRef
    route: ResolvedModel
    body: dict[str, Any]  # what goes upstream
    session: Session
    stored: list[Message]
    plan: transcript.Plan
    request_id: str
    started: float
    headers: dict[str, str] = field(default_factory=dict)  # response headers for the client
    idempotency_key: str | None = None  # hashed Idempotency-Key header
    replay: dict[str, Any] | None = None  # the recorded response for a repeated Idempotency-Key
    injected: list[str] | None = None  # ids of the long-term memories added to the prompt
    fingerprint: str | None = None  # hash of the request body, kept with an idempotent response
    # Set by a protocol edge that keeps its own records of a turn (e.g. a Responses API response
    # id pointing at the recorded reply): called with the recorded messages and the outcome once
    # the session's head is updated; what it returns is written in the same transaction, tagged
    # "<kind>_id" for the tenant's persistence policy (persistence.critical).
    on_record: Callable[[list[Message], dict[str, Any]], list[Record]] | None = None
    protocol: str | None = None  # the client protocol when not Chat Completions, recorded on its messages
    # For the access log: what the provider answered, how long it took, the tokens it counted.
    upstream_status: int | None = None
    upstream_ms: float = 0.0
    usage: dict[str, Any] | None = None  # the provider's token counts
    exchange: Exchange | None = None  # the client protocol's upstream call; None: Chat Completions
    recalled: list[dict[str, Any]] = field(default_factory=list)  # older messages the context stage quoted back


class Pipeline:
    def __init__(self, store: Store, upstream: Upstream, clock: Callable[[], float] = time.time, context: ContextManager | None = None) -> None:
        self.store = store
        self.upstream = upstream
        self.context = context  # fits what goes upstream to the model's token budget
        self.memory: MemoryService | None = None  # long-term memory, set by the app when enabled
        self.locks = SessionLocks()
        self.repaired: list[dict[str, Any]] = []  # sessions repaired at load since start, for the admin API
        # Sessions whose chain hashes this process has checked (once each: 3-15 µs a message),
        # the most recent ones: one forgotten is checked again on its next load.
        self._verified: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.clock = clock
        self.observer = Observer()  # stage timings and counts; the app sets its metrics here

    def session_lock(self, tenant: TenantConfig, ref: SessionRef):
        return self.hold(tenant.name, ref.id, refuse_when_busy=tenant.concurrency == "reject")

    def hold(self, tenant: str, session_id: str, refuse_when_busy: bool):
        """One writer per session: this process's lock, and when other replicas share the store
        (fleet mode) the store's cross-replica lock inside it (a request waits here first, so a
        replica holds at most one store lock, one connection, per session)."""
        local = self.locks.hold(tenant, session_id, refuse_when_busy)
        if not self.store.shared:
            return local
        return self._hold_across_replicas(local, tenant, session_id, refuse_when_busy)

    @contextlib.asynccontextmanager
    async def _hold_across_replicas(self, local: Any, tenant: str, session_id: str, refuse: bool) -> AsyncIterator[None]:
        async with local:
            try:
                async with self.store.session_lock(tenant, session_id, refuse):
                    yield
            except SessionBusy:  # raised only while locking: a nested hold raises Conflict itself
                raise Conflict("another request of this session is in progress; retry when it completes") from None

    def identify(self, tenant: TenantConfig, headers: Mapping[str, str], path_session: str | None, body: Any) -> tuple[SessionRef, dict[str, Any], ResolvedModel]:
        with self._stage(tenant, "identify"):
            body = chat_body(body, tenant.limits, tenant.passthrough_fields)
            route = tenant.route(body["model"])
            if route is None:
                raise NotFound(f"model '{body['model']}' is not configured for this tenant", code="model_not_found")
            ref = identify(tenant.name, headers, path_session, body)
            if ref.implicit and tenant.sessions.implicit == "resume" and not tenant.stateless:
                ref = dataclasses.replace(ref, agent=agent_identity(tenant.name, headers, body, ref.user_id))
            return ref, body, route

    async def resume(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any]) -> SessionRef:
        """The session an agent that restarted without its history continues: its latest one, if
        recent (``sessions.implicit: resume``); otherwise ``ref`` unchanged. Call before locking."""
        if ref.agent is None or any(m.get("role") in ("assistant", "tool") for m in body["messages"]):
            return ref
        latest = await self.store.get_record(tenant.name, AGENT_KIND, ref.agent)
        if latest is None or latest.get("session") in (None, ref.id):
            return ref
        if self.clock() - float(latest.get("ts") or 0) > tenant.sessions.resume_within_seconds:
            return ref
        if await self.store.get_session(tenant.name, latest["session"]) is None:
            return ref  # erased or expired meanwhile
        return dataclasses.replace(ref, id=latest["session"], source="resumed")

    def _stage(self, tenant: TenantConfig, name: str) -> _Stage:
        return _Stage(self.observer, tenant.name, name)

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
            turn = await self._prepare(tenant, ref, body, route, idempotency_key, now, early)
            turn.exchange = exchange
            return turn
        except BaseException:
            if early is not None:
                early.cancel()
            raise

    async def _prepare(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any], route: ResolvedModel,
                       idempotency_key: str | None, now: float, early: QueryEmbedding | None) -> Turn:
        with self._stage(tenant, "load"):
            session, stored = await self._load(tenant, ref, now)
        idempotency = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32] if idempotency_key else None
        fingerprint = request_fingerprint(body) if idempotency is not None else None
        if idempotency is not None:
            replay = await self.store.get_record(tenant.name, IDEMPOTENCY_KIND, idempotency, ref.id)
            if replay is not None and replay.get("fingerprint", fingerprint) != fingerprint:
                raise ProxyError("this Idempotency-Key was used with a different request body; use a new key",
                                 status=422, type="invalid_request_error", code="idempotency_key_reused")
            if replay is not None:  # a client retry: answer with what was recorded, call nothing
                if early is not None:
                    early.cancel()
                plan = transcript.Plan(body["messages"], [], None, replayed=True)
                headers = {"X-Session-ID": ref.id, "X-Request-ID": replay["request_id"], "Idempotent-Replayed": "true"}
                return Turn(tenant, ref, route, body, session, stored, plan, replay["request_id"], now, headers, idempotency, replay)
        live = [m for m in stored if not m.reverted]  # rolled-back turns never match or return
        with self._stage(tenant, "reconcile"):
            incoming, rewritten = body["messages"], 0
            if len(live) < len(stored) and tenant.sessions.reverted_turns == "drop":
                incoming, rewritten = transcript.drop_reverted(stored, incoming)  # rollbacks stick
            plan = transcript.reconcile(live, session.head, incoming, tenant.history)
            _check_storable(incoming, plan.new_messages)  # before the upstream is called
        upstream_body = strip_proxy_fields(body)
        if plan.restored or rewritten:
            upstream_body = upstream_body | {"messages": plan.upstream_messages}
        turn = Turn(tenant, ref, route, upstream_body, session, stored, plan, "req-" + uuid.uuid4().hex, now, idempotency_key=idempotency,
                    fingerprint=fingerprint)
        turn.headers = {"X-Session-ID": ref.id, "X-Request-ID": turn.request_id, "X-Session-Source": ref.source}
        if plan.restored:
            turn.headers["X-History-Restored"] = str(plan.restored)
        if rewritten:
            turn.headers["X-History-Rewritten"] = str(rewritten)
        if plan.gaps:
            turn.headers["X-History-Gap"] = gap_header(plan.gaps)
            log.warning("session %s of tenant %s restored across lost messages %s", ref.id, tenant.name, turn.headers["X-History-Gap"])
        with priority.requests.request():  # background indexing yields the CPU meanwhile
            # The query embedding (the slowest step) runs on the embedder's thread while the
            # context is assembled, which keeps the memory block's tokens free.
            recall = self.memory.begin_recall(turn, early) if self.memory is not None else None
            try:
                if self.context is not None:
                    with self._stage(tenant, "context"):
                        room = await self.context.shape(turn, reserve=recall.room if recall else 0)
                    if recall is not None:
                        recall.room = room
                if recall is not None:
                    with self._stage(tenant, "recall"):
                        await self.memory.finish_recall(turn, recall)  # memories before the newest user message
                    if recall.query is not None:  # the whole recall, its query embedding included
                        self.observer.recalled(tenant.name, time.perf_counter() - recall.started,
                                               turn.headers.get("X-Memory-Status") == "budget-exceeded")
            finally:
                if recall is not None:
                    recall.cancel()  # a no-op once finished; if shaping failed, drops the embedding
        return turn

    async def _load(self, tenant: TenantConfig, ref: SessionRef, now: float) -> tuple[Session, list[Message]]:
        """The session and its messages; expired ones start over, inconsistent ones are repaired."""
        session = await self.store.get_session(tenant.name, ref.id)
        if session is not None and session.last_active + tenant.session_ttl < now:
            await self.store.delete_session(tenant.name, ref.id)  # expired: start over
            if self.memory is not None:
                await self.memory.forget_session(tenant.name, ref.id)
            session = None
        stored = await self.store.get_messages(tenant.name, ref.id)
        if (tenant.name, ref.id) in self._verified:
            self._verified.move_to_end((tenant.name, ref.id))
        else:
            stored = await self._verify_chains(tenant.name, ref.id, stored)
        problem = checkpoints.inconsistency(session, stored)
        if problem is not None:
            saved = await self.store.scan_records(tenant.name, checkpoints.KIND, ref.id)
            session = checkpoints.repair(tenant.name, ref.id, session, stored, saved, now)
            log.warning("session %s of tenant %s repaired (%s): head %s, next seq %d", ref.id, tenant.name, problem, session.head, session.next_seq)
            self.repaired.append({"tenant": tenant.name, "session": ref.id, "problem": problem, "ts": now})
            await self.store.commit(session, [])
        if session is None:
            session = Session(tenant=tenant.name, id=ref.id, created_at=now, last_active=now, user_id=ref.user_id, implicit=ref.implicit)
        return session, stored

    async def _verify_chains(self, tenant: str, session_id: str, stored: list[Message]) -> list[Message]:
        """The first load of a session by this process checks every message against its chain
        hash: one edited on disk (checksum rewritten too) is quarantined like a corrupt record."""
        broken = transcript.broken_chains(stored)
        if broken:
            await self.store.quarantine_messages(tenant, session_id, broken)
            stored = [m for m in stored if m.seq not in broken]
        self._verified[(tenant, session_id)] = None
        if len(self._verified) > VERIFIED_SESSIONS:
            self._verified.popitem(last=False)
        return stored

    async def complete(self, turn: Turn) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            with self._stage(turn.tenant, "upstream"):
                if turn.exchange is not None:
                    response = await turn.exchange.complete(self.upstream, turn)
                else:
                    response = await self.upstream.complete(turn.route, turn.body, turn.tenant.upstream_timeout)
        except ProxyError as error:
            self.observer.upstream_failed(turn.tenant.name, turn.route.model, error.status)
            turn.upstream_ms = (time.perf_counter() - started) * 1000
            turn.upstream_status = getattr(error, "provider_status", None)
            await self._record(turn, [], outcome="error")
            raise
        turn.upstream_ms, turn.upstream_status = (time.perf_counter() - started) * 1000, 200
        if turn.exchange is not None:
            assistant, finish, usage, model = turn.exchange.reply(response)
        else:
            choices = response.get("choices") or []
            assistant = [c.get("message") or {} for c in choices if isinstance(c, dict)]
            finish = choices[0].get("finish_reason") if choices else None
            usage, model = response.get("usage"), response.get("model")
        turn.usage = usage if isinstance(usage, dict) else None
        await self._record(turn, assistant, outcome="ok", finish_reason=finish, usage=usage, model=model, response=response)
        return response

    async def stream(self, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        """Relay the provider's chunks (in the batches they arrived in); record the response when
        the stream ends, however it ends."""
        keep = turn.idempotency_key is not None
        collected = turn.exchange.collector(keep) if turn.exchange is not None else _StreamCollector(keep_chunks=keep)
        outcome = "aborted"
        started = time.perf_counter()
        try:
            # aclosing: a client that goes away closes this generator, which must close the
            # provider's stream (and its connection) now, not whenever it is garbage-collected.
            if turn.exchange is not None:
                upstream = turn.exchange.stream(self.upstream, turn)
            else:
                upstream = self.upstream.stream(turn.route, turn.body, turn.tenant.upstream_timeout)
            with self._stage(turn.tenant, "upstream"):  # to the stream's end
                async with contextlib.aclosing(upstream) as chunks:
                    async for batch in chunks:
                        for chunk in batch:
                            collected.add(chunk)
                        yield batch
            outcome = "ok"
            turn.upstream_status = 200
        except ProxyError as error:
            outcome = "error"
            self.observer.upstream_failed(turn.tenant.name, turn.route.model, error.status)
            turn.upstream_status = getattr(error, "provider_status", None)
            raise
        except Exception:  # something here failed, not the provider: still never "aborted"
            outcome = "error"
            raise
        finally:
            turn.upstream_ms = (time.perf_counter() - started) * 1000
            turn.usage = collected.usage if isinstance(collected.usage, dict) else None
            # Runs on success, on failure and when the client disconnects (the generator is
            # closed: GeneratorExit), so a partial answer is kept with its outcome.
            await self._record(
                turn, collected.messages(), outcome=outcome, finish_reason=collected.finish_reason(),
                usage=collected.usage, model=collected.model, chunks=collected.chunks if outcome == "ok" else None,
            )

    async def _record(
        self, turn: Turn, assistant: list[dict[str, Any]], *, outcome: str, finish_reason: str | None = None,
        usage: dict[str, Any] | None = None, model: str | None = None,
        response: dict[str, Any] | None = None, chunks: list[dict[str, Any]] | None = None,
    ) -> None:
        """Append the new messages and the answer; durable now or batched, per the tenant's policy."""
        turn.usage = usage if isinstance(usage, dict) else None
        saved = int(turn.headers.get("X-Context-Tokens-Saved") or 0)
        self.observer.recorded(turn.tenant.name, turn.ref.id, usage if isinstance(usage, dict) else None, saved)
        if turn.tenant.stateless:
            return
        with self._stage(turn.tenant, "record"):
            await self._record_turn(turn, assistant, outcome, finish_reason, usage, model, response, chunks)

    async def _record_turn(self, turn: Turn, assistant: list[dict[str, Any]], outcome: str, finish_reason: str | None,
                           usage: dict[str, Any] | None, model: str | None,
                           response: dict[str, Any] | None, chunks: list[dict[str, Any]] | None) -> None:
        session, plan, now = turn.session, turn.plan, self.clock()
        parent = plan.parent.seq if plan.parent else None
        chain = plan.parent.chain if plan.parent else transcript.ROOT_CHAIN
        branch = session.branches + 1 if plan.branched else (plan.parent.branch if plan.parent else 0)
        records: list[Message] = []
        encoding = tokens.encoding_for(turn.route.model)

        def append(body: dict[str, Any], **meta: Any) -> None:
            nonlocal parent, chain
            chain = transcript.chain_hash(chain, body)
            message = Message(
                seq=session.next_seq, parent=parent, chain=chain, role=str(body.get("role")), body=body,
                ts=now, request_id=turn.request_id, branch=branch, tokens=tokens.count_message(body, encoding),
                tokenizer=encoding, tags=tag_message(body), protocol=turn.protocol, **meta,
            )
            session.next_seq += 1
            parent = message.seq
            records.append(message)

        pace = Pace()  # a new session arriving with thousands of messages: hashes, counts and tags in slices
        for body in plan.new_messages:
            append(body, outcome="error" if outcome == "error" else "ok")
            await pace.tick()
        if assistant and (assistant[0].get("content") or assistant[0].get("tool_calls") or outcome == "ok"):
            reply = _clean_assistant(assistant[0])
            append(
                reply,
                model=model or turn.route.requested,
                latency_ms=round((now - turn.started) * 1000, 3),
                finish_reason=finish_reason,
                outcome=outcome,
                alternatives=[_clean_assistant(a) for a in assistant[1:]] or None,
                injected=turn.injected,
                usage=_request_tokens(turn, usage),
            )
        if plan.branched and records:
            session.branches += 1
        if records:
            session.head = parent
        session.last_active = now
        session.turns += 1
        if ref_user := turn.ref.user_id:
            session.user_id = ref_user
        if isinstance(usage, dict):
            session.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            session.completion_tokens += int(usage.get("completion_tokens") or 0)
            caching.account(turn, usage)  # the provider's cached prompt tokens

        aux: list[Record] = []
        tags = {tag for m in records for tag in (m.tags or ())}
        if any(m.body.get("tool_calls") or _has_tool_use(m.body) for m in records):
            tags.add("tool_calls")
        if turn.idempotency_key and (response is not None or chunks is not None):
            tags.add("idempotent")
            replay = {"request_id": turn.request_id, "response": response, "chunks": chunks, "fingerprint": turn.fingerprint}
            aux.append(Record(IDEMPOTENCY_KIND, turn.idempotency_key, replay, session.id))
        aux += self._checkpoint_if_due(turn.tenant, session, records, now)
        if turn.ref.agent is not None:  # where this agent resumes after a restart
            aux.append(Record(AGENT_KIND, turn.ref.agent, {"session": session.id, "ts": now}))
        edge = turn.on_record(records, {"outcome": outcome, "finish_reason": finish_reason, "usage": usage, "model": model}) if turn.on_record else []
        tags.update(record.kind + "_id" for record in edge)  # e.g. response_id: the policy says if it is critical
        write = Write(session.tenant, session, records, aux + edge)
        try:
            if turn.tenant.persistence.durable(tags):
                await self.store.apply([write])
            else:
                await self.store.apply([write], durable=False)
        except StorageError as exc:
            log.critical("could not record turn %s of session %s: %s", turn.request_id, session.id, exc)
            raise ProxyError("the proxy could not persist this turn; it was not acknowledged", status=503, code="storage_error") from exc
        except InvalidWrite as exc:  # the request's messages were checked: the provider's answer is at fault
            log.error("could not record turn %s of session %s: %s", turn.request_id, session.id, exc)
            raise UpstreamError(f"the provider's answer cannot be stored: {exc}", status=502, code="unstorable_response") from exc
        if self.context is not None:
            self.context.after_record(turn, records)  # background summaries, off the request path
        if self.memory is not None:
            await self.memory.after_record(turn, records)  # background indexing, off the request path

    def _checkpoint_if_due(self, tenant: TenantConfig, session: Session, records: list[Message], now: float) -> list[Record]:
        policy = tenant.persistence
        last = session.extra.get("checkpoint") or {"seq": 0, "ts": session.created_at}
        if session.next_seq - last["seq"] < policy.checkpoint_every_messages and now - last["ts"] < policy.checkpoint_every_seconds:
            return []
        head_chain = next((m.chain for m in reversed(records) if m.seq == session.head), None)
        key, value = checkpoints.make(session, head_chain, now)
        kept = session.extra.get("checkpoints", []) + [key]
        session.extra["checkpoints"] = kept[-policy.keep_checkpoints:]
        session.extra["checkpoint"] = {"seq": session.next_seq, "ts": now, "key": key}
        expired = [Record(checkpoints.KIND, old, None, session.id) for old in kept[:-policy.keep_checkpoints]]
        return [Record(checkpoints.KIND, key, value, session.id)] + expired


def _check_storable(messages: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    """Refuse, naming it, a new message that could not be stored as it would be read back and
    forwarded later (the transcript keeps every message, also those the context window drops)."""
    for message in new:
        try:
            codec.encode({"body": message})  # one level of wrapping, as in its Message record
        except codec.Unstorable as exc:
            index = next((i for i, m in enumerate(messages) if m is message), None)
            where = f"messages[{index}]" if index is not None else "a message"
            raise BadRequest(f"{where} cannot be stored: {exc}", code="invalid_value", param=where) from None
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


def _request_tokens(turn: Turn, usage: dict[str, Any] | None) -> dict[str, int] | None:
    """The tokens of the request that produced an answer, as the inspector charts them: what the
    provider counted (prompt, completion, cached) and what context management sent of the full
    history. Only the counts that are known."""
    counts: dict[str, int] = {}
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        for name, value in (("prompt", usage.get("prompt_tokens")), ("completion", usage.get("completion_tokens")), ("cached", cached)):
            if isinstance(value, int) and not isinstance(value, bool):
                counts[name] = value
    sent, saved = turn.headers.get("X-Context-Tokens"), turn.headers.get("X-Context-Tokens-Saved")
    if sent is not None and saved is not None:
        counts["sent"], counts["full"] = int(sent), int(sent) + int(saved)
    return counts or None


def request_fingerprint(body: dict[str, Any]) -> str:
    """The request as a hash, key order ignored: a retry under one Idempotency-Key must match it."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def gap_header(gaps: list[transcript.Gap]) -> str:
    """``X-History-Gap``: the lost seqs as ranges, e.g. ``3-4,9`` (``?`` when not known)."""
    ranges = []
    for gap in gaps:
        missing = gap.missing
        if not missing:
            ranges.append("?")
            continue
        start = prev = missing[0]
        for seq in missing[1:] + (None,):
            if seq != (prev + 1 if prev is not None else None):
                ranges.append(str(start) if start == prev else f"{start}-{prev}")
                start = seq
            prev = seq
    return ",".join(ranges)


def _has_tool_use(body: dict[str, Any]) -> bool:
    """Tool calls carried as content blocks (the Anthropic shape) count like ``tool_calls``."""
    content = body.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)


def _clean_assistant(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as a client will resend it: role, content, tool calls; no nulls."""
    cleaned: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    for key in ("tool_calls", "function_call", "refusal", "audio", "name"):
        if message.get(key):
            cleaned[key] = message[key]
    return cleaned


class _StreamCollector:
    """Reassembles streamed chunks into the messages the provider sent."""

    def __init__(self, keep_chunks: bool = False) -> None:
        self.chunks: list[dict[str, Any]] | None = [] if keep_chunks else None  # for idempotent replays
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if self.chunks is not None:
            self.chunks.append(chunk)
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            state = self.choices.setdefault(choice.get("index", 0), {"content": [], "tool_calls": {}, "finish": None})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                state["content"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = state["tool_calls"].setdefault(call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    slot["function"]["name"] += function["name"]
                if function.get("arguments"):
                    slot["function"]["arguments"] += function["arguments"]
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]

    def messages(self) -> list[dict[str, Any]]:
        result = []
        for index in sorted(self.choices):
            state = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state["content"]) or None}
            if state["tool_calls"]:
                message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
            result.append(message)
        return result

    def finish_reason(self) -> str | None:
        return self.choices[0]["finish"] if 0 in self.choices else None
