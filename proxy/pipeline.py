"""The chat request pipeline: identify → load state → reconcile history → call upstream → record.

Each stage lives in its own module; this one puts them in order, so the whole flow of a
request reads top to bottom in ``Pipeline.prepare`` and ``Pipeline.complete``/``stream``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping

from proxy import checkpoints, priority, tokens, transcript
from proxy.config import ResolvedModel, TenantConfig
from proxy.context import caching
from proxy.context.importance import tag_message
from proxy.context.manager import ContextManager
from proxy.errors import NotFound, ProxyError
from proxy.records import Message, Session
from proxy.sessions import SessionLocks, SessionRef, identify, strip_proxy_fields
from proxy.storage.base import Record, StorageError, Write
from proxy.storage.write_behind import WriteBehindStore
from proxy.upstream import Upstream
from proxy.validate import chat_body

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService, QueryEmbedding

log = logging.getLogger("agent_state_proxy.pipeline")
IDEMPOTENCY_KIND = "idempotency"


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
    recalled: list[dict[str, Any]] = field(default_factory=list)  # older messages the context stage quoted back


class Pipeline:
    def __init__(self, store: WriteBehindStore, upstream: Upstream, clock: Callable[[], float] = time.time, context: ContextManager | None = None) -> None:
        self.store = store
        self.upstream = upstream
        self.context = context  # fits what goes upstream to the model's token budget
        self.memory: MemoryService | None = None  # long-term memory, set by the app when enabled
        self.locks = SessionLocks()
        self.repaired: list[dict[str, Any]] = []  # sessions repaired at load since start, for the admin API
        self.clock = clock

    def session_lock(self, tenant: TenantConfig, ref: SessionRef):
        return self.locks.hold(tenant.name, ref.id, refuse_when_busy=tenant.concurrency == "reject")

    def identify(self, tenant: TenantConfig, headers: Mapping[str, str], path_session: str | None, body: Any) -> tuple[SessionRef, dict[str, Any], ResolvedModel]:
        body = chat_body(body)
        route = tenant.route(body["model"])
        if route is None:
            raise NotFound(f"model '{body['model']}' is not configured for this tenant", code="model_not_found")
        return identify(tenant.name, headers, path_session, body), body, route

    async def prepare(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any], route: ResolvedModel, idempotency_key: str | None = None) -> Turn:
        """Load the session (call under the session lock) and decide what goes upstream."""
        now = self.clock()
        if tenant.stateless:
            session = Session(tenant=tenant.name, id=ref.id, created_at=now, last_active=now)
            plan = transcript.Plan(body["messages"], [], None)
            return Turn(tenant, ref, route, strip_proxy_fields(body), session, [], plan, "req-" + uuid.uuid4().hex, now,
                        headers={"X-Session-ID": ref.id})
        # The query embedding (the slowest step of the request) starts before anything else.
        early = self.memory.embed_query(tenant.name, body) if self.memory is not None else None
        try:
            return await self._prepare(tenant, ref, body, route, idempotency_key, now, early)
        except BaseException:
            if early is not None:
                early.cancel()
            raise

    async def _prepare(self, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any], route: ResolvedModel,
                       idempotency_key: str | None, now: float, early: QueryEmbedding | None) -> Turn:
        session, stored = await self._load(tenant, ref, now)
        idempotency = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32] if idempotency_key else None
        if idempotency is not None:
            replay = await self.store.get_record(tenant.name, IDEMPOTENCY_KIND, idempotency, ref.id)
            if replay is not None:  # a client retry: answer with what was recorded, call nothing
                if early is not None:
                    early.cancel()
                plan = transcript.Plan(body["messages"], [], None, replayed=True)
                headers = {"X-Session-ID": ref.id, "X-Request-ID": replay["request_id"], "Idempotent-Replayed": "true"}
                return Turn(tenant, ref, route, body, session, stored, plan, replay["request_id"], now, headers, idempotency, replay)
        live = [m for m in stored if not m.reverted]  # rolled-back turns never match or return
        plan = transcript.reconcile(live, session.head, body["messages"], tenant.history)
        upstream_body = strip_proxy_fields(body)
        if plan.restored:
            upstream_body = upstream_body | {"messages": plan.upstream_messages}
        turn = Turn(tenant, ref, route, upstream_body, session, stored, plan, "req-" + uuid.uuid4().hex, now, idempotency_key=idempotency)
        turn.headers = {"X-Session-ID": ref.id, "X-Request-ID": turn.request_id}
        if plan.restored:
            turn.headers["X-History-Restored"] = str(plan.restored)
        with priority.requests.request():  # background indexing yields the CPU meanwhile
            # The query embedding (the slowest step) runs on the embedder's thread while the
            # context is assembled, which keeps the memory block's tokens free.
            recall = self.memory.begin_recall(turn, early) if self.memory is not None else None
            try:
                if self.context is not None:
                    room = await self.context.shape(turn, reserve=recall.room if recall else 0)
                    if recall is not None:
                        recall.room = room
                if recall is not None:
                    await self.memory.finish_recall(turn, recall)  # memories before the newest user message
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

    async def complete(self, turn: Turn) -> dict[str, Any]:
        try:
            response = await self.upstream.complete(turn.route, turn.body, turn.tenant.upstream_timeout)
        except ProxyError:
            await self._record(turn, [], outcome="error")
            raise
        choices = response.get("choices") or []
        assistant = [c.get("message") or {} for c in choices if isinstance(c, dict)]
        finish = choices[0].get("finish_reason") if choices else None
        await self._record(turn, assistant, outcome="ok", finish_reason=finish, usage=response.get("usage"), model=response.get("model"), response=response)
        return response

    async def stream(self, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        """Relay the provider's chunks (in the batches they arrived in); record the response when
        the stream ends, however it ends."""
        collected = _StreamCollector(keep_chunks=turn.idempotency_key is not None)
        outcome = "aborted"
        try:
            # aclosing: a client that goes away closes this generator, which must close the
            # provider's stream (and its connection) now, not whenever it is garbage-collected.
            upstream = self.upstream.stream(turn.route, turn.body, turn.tenant.upstream_timeout)
            async with contextlib.aclosing(upstream) as chunks:
                async for batch in chunks:
                    for chunk in batch:
                        collected.add(chunk)
                    yield batch
            outcome = "ok"
        except ProxyError:
            outcome = "error"
            raise
        finally:
            # Runs on success, on upstream failure and when the client disconnects (the
            # generator is closed), so a partial answer is kept with its outcome.
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
        if turn.tenant.stateless:
            return
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
                tokenizer=encoding, tags=tag_message(body), **meta,
            )
            session.next_seq += 1
            parent = message.seq
            records.append(message)

        for body in plan.new_messages:
            append(body, outcome="error" if outcome == "error" else "ok")
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
        if any(m.body.get("tool_calls") for m in records):
            tags.add("tool_calls")
        if turn.idempotency_key and (response is not None or chunks is not None):
            tags.add("idempotent")
            replay = {"request_id": turn.request_id, "response": response, "chunks": chunks}
            aux.append(Record(IDEMPOTENCY_KIND, turn.idempotency_key, replay, session.id))
        aux += self._checkpoint_if_due(turn.tenant, session, records, now)
        write = Write(session.tenant, session, records, aux)
        try:
            if turn.tenant.persistence.durable(tags):
                await self.store.apply([write])
            else:
                await self.store.apply_later([write])
        except StorageError as exc:
            log.critical("could not record turn %s of session %s: %s", turn.request_id, session.id, exc)
            raise ProxyError("the proxy could not persist this turn; it was not acknowledged", status=503, code="storage_error") from exc
        if self.context is not None:
            self.context.after_record(turn, records)  # background summaries, off the request path
        if self.memory is not None:
            self.memory.after_record(turn, records)  # background indexing, off the request path

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
