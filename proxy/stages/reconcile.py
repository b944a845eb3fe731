"""The reconcile stage: what the client sent, matched against the stored transcript."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy import codec, transcript
from proxy.errors import BadRequest
from proxy.records import Message, Session

if TYPE_CHECKING:
    from proxy.config import TenantConfig

log = logging.getLogger("agent_state_proxy.pipeline")


@dataclass(frozen=True)
class History:
    """The reconciled history: the plan (what to send, what to record) and its response headers."""

    plan: transcript.Plan
    messages: list[dict[str, Any]] | None  # what goes upstream when not what the client sent
    headers: dict[str, str] = field(default_factory=dict)


def reconcile(tenant: TenantConfig, session: Session, stored: list[Message], body: dict[str, Any]) -> History:
    """Restore what the client left out, drop what was rolled back, find where the new messages
    attach; refuse a new message that could not be stored, before the upstream is called."""
    live = [m for m in stored if not m.reverted]  # rolled-back turns never match or return
    incoming, rewritten = body["messages"], 0
    if len(live) < len(stored) and tenant.sessions.reverted_turns == "drop":
        incoming, rewritten = transcript.drop_reverted(stored, incoming)  # rollbacks stick
    plan = transcript.reconcile(live, session.head, incoming, tenant.history)
    _check_storable(incoming, plan.new_messages)
    headers: dict[str, str] = {}
    if plan.restored:
        headers["X-History-Restored"] = str(plan.restored)
    if rewritten:
        headers["X-History-Rewritten"] = str(rewritten)
    if plan.gaps:
        headers["X-History-Gap"] = gap_header(plan.gaps)
        log.warning("session %s of tenant %s restored across lost messages %s", session.id, tenant.name, headers["X-History-Gap"])
    return History(plan, plan.upstream_messages if plan.restored or rewritten else None, headers)


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
