"""Rollback and fork of a session's transcript, each one consistent write.

Rolled-back messages are kept (marked ``reverted``) for audit; they leave the active path, the
context and long-term memory. Derived records that covered them (summaries) are deleted in
the same transaction, so nothing built on a reverted turn survives it.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from proxy import checkpoints
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.records import Message, Session
from proxy.storage.base import Record, Store, Write
from proxy.transcript import ROOT_CHAIN, active_path, chain_hash

DERIVED_KINDS = ("summary",)  # session-scoped records built from messages


@dataclasses.dataclass
class Target:
    head: int | None  # the last message kept
    reverted: list[int]  # seqs leaving the transcript
    restored: Session | None = None  # counters from a checkpoint, when rolling back to one
    checkpoint: str | None = None


async def resolve(store: Store, session: Session, messages: list[Message], spec: dict[str, Any]) -> Target:
    """Where ``{"turns": N}`` or ``{"checkpoint": key}`` points, and what it reverts."""
    live = [m for m in messages if not m.reverted]
    path = active_path(live, session.head)
    if set(spec) - {"turns", "checkpoint", "session_id"} or ("turns" in spec) == ("checkpoint" in spec):
        raise BadRequest("give exactly one of 'turns' (a positive integer) or 'checkpoint' (a checkpoint id)", code="invalid_rollback")
    if "turns" in spec:
        turns = spec["turns"]
        starts = [i for i, m in enumerate(path) if m.role == "user"]
        if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= len(starts):
            raise BadRequest(f"'turns' must be an integer between 1 and {len(starts)} (the session's user turns)", code="invalid_rollback")
        cut = starts[-turns]
        return Target(path[cut - 1].seq if cut else None, [m.seq for m in path[cut:]])
    key = spec["checkpoint"]
    key = session.extra.get(checkpoints.NAMED, {}).get(key, key) if isinstance(key, str) else key  # a name works too
    value = await store.get_record(session.tenant, checkpoints.KIND, str(key), session.id) if isinstance(key, str) else None
    if value is None:
        raise NotFound(f"no checkpoint '{key}' for this session", code="checkpoint_not_found")
    reason = checkpoints.problem(value)
    if reason is not None:
        raise BadRequest(f"checkpoint '{key}' is invalid ({reason}); choose another", code="invalid_checkpoint")
    restored = Session.from_dict(value["session"])
    kept = {m.seq for m in active_path(live, restored.head)}
    reverted = [m.seq for m in live if m.seq >= restored.next_seq or (m.seq in {p.seq for p in path} and m.seq not in kept)]
    return Target(restored.head, sorted(reverted), restored, key)


async def rollback(store: Store, session: Session, messages: list[Message], spec: dict[str, Any], now: float) -> dict[str, Any]:
    target = await resolve(store, session, messages, spec)
    reverted = set(target.reverted)
    for message in messages:  # seq order: a branch growing off a reverted message goes with it
        if message.parent in reverted and not message.reverted:
            reverted.add(message.seq)
    changed = [dataclasses.replace(m, reverted=True) for m in messages if m.seq in reverted]
    if target.restored is not None:
        for name in ("turns", "prompt_tokens", "completion_tokens", "branches"):
            setattr(session, name, getattr(target.restored, name))
    session.head = target.head
    session.last_active = now
    history = session.extra.setdefault("rollbacks", [])
    history.append({"ts": now, "reverted": sorted(reverted), "head": target.head, "checkpoint": target.checkpoint})
    derived = await _derived_covering(store, session, reverted)
    await store.apply([Write(session.tenant, session, changed, derived)])
    return {"id": session.id, "head": target.head, "reverted": sorted(reverted), "checkpoint": target.checkpoint,
            "derived_removed": len(derived)}


def fork_id(spec: dict[str, Any]) -> str:
    """The id a fork creates: the one asked for, or a fresh one."""
    new_id = spec.get("session_id") or f"fork-{uuid.uuid4().hex[:16]}"
    if not isinstance(new_id, str) or not new_id.isprintable() or len(new_id) > 512:
        raise BadRequest("'session_id' must be a printable string of at most 512 characters", code="invalid_session_id")
    return new_id


async def fork(store: Store, session: Session, messages: list[Message], spec: dict[str, Any], now: float) -> Session:
    """A new session holding the active path up to the target; the source is untouched.

    Call holding the target id's session lock, so no request can be creating it meanwhile.
    """
    new_id = fork_id(spec)
    if await store.get_session(session.tenant, new_id) is not None:
        raise Conflict(f"session '{new_id}' already exists", code="session_exists")
    spec = {k: v for k, v in spec.items() if k != "session_id"}
    live = [m for m in messages if not m.reverted]
    if spec:
        head = (await resolve(store, session, messages, spec)).head
    else:
        head = session.head
    path = active_path(live, head)
    # The source's turns after the fork point come along marked reverted: a client that keeps
    # its own history resends them, and they must be recognised (and dropped), not recorded anew.
    full = active_path(live, session.head)
    cut = full[len(path):] if full[:len(path)] == path else []
    copies = []
    chain = ROOT_CHAIN
    for seq, message in enumerate(path + cut):
        # Chains are recomputed: a path across a lost message links to a new parent.
        chain = chain_hash(chain, message.body)
        copies.append(dataclasses.replace(message, seq=seq, parent=seq - 1 if seq else None, branch=0, chain=chain,
                                          reverted=seq >= len(path)))
    forked = Session(
        tenant=session.tenant, id=new_id, created_at=now, last_active=now, user_id=session.user_id,
        head=len(path) - 1 if path else None, next_seq=len(copies),
        turns=sum(1 for m in path if m.role == "assistant"),
        extra={"forked_from": {"session": session.id, "seq": head}},
    )
    await store.apply([Write(session.tenant, forked, copies)])
    return forked


async def _derived_covering(store: Store, session: Session, reverted: set[int]) -> list[Record]:
    if not reverted:
        return []
    first = min(reverted)
    doomed = []
    for kind in DERIVED_KINDS:
        for key, value in await store.scan_records(session.tenant, kind, session.id):
            covers = value.get("covers") or value.get("seqs")
            if isinstance(covers, list):
                hit = bool(reverted & set(covers))
            else:
                last = value.get("to_seq", value.get("end_seq"))
                hit = not isinstance(last, int) or last >= first
            if hit:
                doomed.append(Record(kind, key, None, session.id))
    return doomed
