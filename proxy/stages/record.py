"""The record stage: a turn's new messages and its answer appended to the session, in one write."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy import checkpoints, tokens, transcript
from proxy.context import caching
from proxy.context.importance import tag_message
from proxy.errors import ProxyError, UpstreamError
from proxy.pacing import Pace
from proxy.records import Message, Session
from proxy.stages.identify import AGENT_KIND
from proxy.stages.replay import IDEMPOTENCY_KIND
from proxy.storage.base import InvalidWrite, Record, StorageError, Write
from proxy.turn import Turn

if TYPE_CHECKING:
    from proxy.config import TenantConfig
    from proxy.storage.base import Store

log = logging.getLogger("agent_state_proxy.pipeline")


@dataclass(frozen=True)
class Answer:
    """What the upstream answered, however the call ended (outcome: ok, error or aborted)."""

    assistant: list[dict[str, Any]]
    outcome: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    response: dict[str, Any] | None = None  # the whole answer, kept for an idempotent replay
    chunks: list[dict[str, Any]] | None = None  # the streamed answer, kept for an idempotent replay


async def record(store: Store, turn: Turn, answer: Answer, now: float) -> tuple[list[Message], dict[str, str]]:
    """Append the new messages and the answer; durable now or batched, per the tenant's policy.
    Returns the messages recorded and the response headers the provider's usage gave."""
    session, plan = turn.session, turn.plan
    outcome, usage = answer.outcome, answer.usage
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
    assistant = answer.assistant
    if assistant and (assistant[0].get("content") or assistant[0].get("tool_calls") or outcome == "ok"):
        append(
            clean_assistant(assistant[0]),
            model=answer.model or turn.route.requested,
            latency_ms=round((now - turn.started) * 1000, 3),
            finish_reason=answer.finish_reason,
            outcome=outcome,
            alternatives=[clean_assistant(a) for a in assistant[1:]] or None,
            injected=turn.injected,
            usage=request_tokens(turn, usage),
        )
    if plan.branched and records:
        session.branches += 1
    if records:
        session.head = parent
    session.last_active = now
    session.turns += 1
    if ref_user := turn.ref.user_id:
        session.user_id = ref_user
    headers: dict[str, str] = {}
    if isinstance(usage, dict):
        session.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        session.completion_tokens += int(usage.get("completion_tokens") or 0)
        headers = caching.account(session, usage)  # the provider's cached prompt tokens

    aux: list[Record] = []
    tags = {tag for m in records for tag in (m.tags or ())}
    if any(m.body.get("tool_calls") or _has_tool_use(m.body) for m in records):
        tags.add("tool_calls")
    if turn.idempotency_key and (answer.response is not None or answer.chunks is not None):
        tags.add("idempotent")
        replay = {"request_id": turn.request_id, "response": answer.response, "chunks": answer.chunks, "fingerprint": turn.fingerprint}
        aux.append(Record(IDEMPOTENCY_KIND, turn.idempotency_key, replay, session.id))
    aux += checkpoint_if_due(turn.tenant, session, records, now)
    if turn.ref.agent is not None:  # where this agent resumes after a restart
        aux.append(Record(AGENT_KIND, turn.ref.agent, {"session": session.id, "ts": now}))
    outcome_of = {"outcome": outcome, "finish_reason": answer.finish_reason, "usage": usage, "model": answer.model}
    edge = turn.on_record(records, outcome_of) if turn.on_record else []
    tags.update(record.kind + "_id" for record in edge)  # e.g. response_id: the policy says if it is critical
    write = Write(session.tenant, session, records, aux + edge)
    try:
        if turn.tenant.persistence.durable(tags):
            await store.apply([write])
        else:
            await store.apply([write], durable=False)
    except StorageError as exc:
        log.critical("could not record turn %s of session %s: %s", turn.request_id, session.id, exc)
        raise ProxyError("the proxy could not persist this turn; it was not acknowledged", status=503, code="storage_error") from exc
    except InvalidWrite as exc:  # the request's messages were checked: the provider's answer is at fault
        log.error("could not record turn %s of session %s: %s", turn.request_id, session.id, exc)
        raise UpstreamError(f"the provider's answer cannot be stored: {exc}", status=502, code="unstorable_response") from exc
    return records, headers


def checkpoint_if_due(tenant: TenantConfig, session: Session, records: list[Message], now: float) -> list[Record]:
    """A checkpoint of the session every so many messages or seconds (and the oldest let go)."""
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


def request_tokens(turn: Turn, usage: dict[str, Any] | None) -> dict[str, int] | None:
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


def _has_tool_use(body: dict[str, Any]) -> bool:
    """Tool calls carried as content blocks (the Anthropic shape) count like ``tool_calls``."""
    content = body.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)


def clean_assistant(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as a client will resend it: role, content, tool calls; no nulls."""
    cleaned: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    for key in ("tool_calls", "function_call", "refusal", "audio", "name"):
        if message.get(key):
            cleaned[key] = message[key]
    return cleaned
