"""Checkpoints: validated snapshots of a session's derived state, and lazy per-session repair.

A checkpoint holds the session record (window position, counters, head) and the chain hash
of its head message, with a format version and a checksum. Recovery never trusts one blindly:
it checks the checksum, the schema, and that timestamps and sequence numbers only grow.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import operator
from typing import Any

import orjson

from proxy.records import Message, Session

_seq = operator.attrgetter("seq")

log = logging.getLogger("agent_state_proxy.recovery")

FORMAT = 1
KIND = "checkpoint"
NAMED = "named_checkpoints"  # session.extra: checkpoint name -> key
MAX_NAMED = 100


def make(session: Session, head_chain: str | None, now: float, derived: dict[str, Any] | None = None,
         name: str | None = None) -> tuple[str, dict[str, Any]]:
    """A checkpoint record (key, value) for the session as it is now; ``name`` for one an
    operator or agent asked for (kept until the session goes, never rotated out)."""
    snapshot = session.to_dict()
    snapshot["extra"] = {k: v for k, v in snapshot["extra"].items() if k not in ("checkpoints", NAMED)}
    payload = {"format": FORMAT, "ts": now, "seq": session.next_seq, "head_chain": head_chain, "session": snapshot, "derived": derived or {}}
    if name is not None:
        payload["name"] = name
    payload["checksum"] = _checksum(payload)
    return f"{session.next_seq:012d}-{int(now * 1000):015d}", payload


def named(session: Session, messages: list[Message], name: str, now: float) -> tuple[str, dict[str, Any]]:
    """A named checkpoint of the session as it is now, registered in ``session.extra``."""
    head_chain = next((m.chain for m in reversed(messages) if m.seq == session.head), None)
    key, value = make(session, head_chain, now, name=name)
    session.extra[NAMED] = session.extra.get(NAMED, {}) | {name: key}
    return key, value


def problem(value: Any, newer: dict[str, Any] | None = None) -> str | None:
    """Why a checkpoint cannot be trusted, or None. ``newer`` is the next newer valid one."""
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        return "unknown format"
    if value.get("checksum") != _checksum({k: v for k, v in value.items() if k != "checksum"}):
        return "checksum mismatch"
    session = value.get("session")
    if not isinstance(session, dict) or not isinstance(value.get("seq"), int) or not isinstance(value.get("ts"), (int, float)):
        return "schema"
    try:
        Session.from_dict(session)
    except TypeError:
        return "schema"
    if session.get("next_seq") != value["seq"]:
        return "sequence number disagrees with the session"
    if newer is not None and (newer["seq"] < value["seq"] or newer["ts"] < value["ts"]):
        return "timestamps or sequence numbers go backwards"
    return None


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def newest_valid(checkpoints: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that validates, falling back through older ones."""
    newer = None
    for key, value in reversed(checkpoints):
        reason = problem(value, newer)
        if reason is None:
            return key, value
        log.warning("checkpoint %s invalid (%s); trying the previous one", key, reason)
    return None


def inconsistency(session: Session | None, messages: list[Message]) -> str | None:
    """Why a session record does not describe its messages (in seq order), or None when it does."""
    if session is None:
        return "session record missing" if messages else None
    # ``messages`` are in seq order (Store.get_messages): no set of a long session's seqs.
    if messages and session.next_seq <= messages[-1].seq:
        return "next_seq behind the stored messages"
    if session.head is not None:
        at = bisect.bisect_left(messages, session.head, key=_seq)
        if at == len(messages) or messages[at].seq != session.head:
            return "head message missing"
    if session.head is None and any(not m.reverted for m in messages):
        return "head missing"
    return None


def repair(tenant: str, session_id: str, session: Session | None, messages: list[Message],
           checkpoints: list[tuple[str, dict[str, Any]]], now: float) -> Session:
    """Rebuild a session record: newest valid checkpoint, then replay the messages after it."""
    found = newest_valid(checkpoints)
    if found is not None:
        base = Session.from_dict(found[1]["session"])
    elif session is not None:
        base = session
    else:
        created = min((m.ts for m in messages), default=now)
        base = Session(tenant=tenant, id=session_id, created_at=created, last_active=created)
    base.tenant, base.id = tenant, session_id
    live = [m for m in messages if not m.reverted]
    replayed = [m for m in live if m.seq >= base.next_seq]
    base.next_seq = max([base.next_seq] + [m.seq + 1 for m in messages])
    by_seq = {m.seq for m in live}
    if replayed:
        base.head = replayed[-1].seq
    elif base.head not in by_seq:
        base.head = live[-1].seq if live else None
    for message in replayed:
        base.last_active = max(base.last_active, message.ts)
        if message.role == "assistant":
            base.turns += 1
    return base
