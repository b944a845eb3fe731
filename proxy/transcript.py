"""History reconciliation: match a resent conversation against the stored transcript tree."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.records import Message

# Fields that define a message's identity; anything else the client adds (e.g. cache hints)
# must not make a resent message look new.
_IDENTITY_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")


def message_hash(body: dict[str, Any]) -> bytes:
    identity = {k: body.get(k) for k in _IDENTITY_FIELDS if body.get(k) is not None}
    if identity.get("role") == "assistant" and isinstance(identity.get("tool_calls"), list):
        # SDKs echo tool calls back with or without optional keys; keep only what defines them.
        identity["tool_calls"] = [
            {"id": c.get("id"), "function": (c.get("function") or {})}
            for c in identity["tool_calls"]
            if isinstance(c, dict)
        ]
    if isinstance(identity.get("content"), list):
        identity["content"] = [block_identity(b) for b in identity["content"]]
    if identity.get("content") == "":
        identity.pop("content")
    return hashlib.blake2b(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def block_identity(block: Any) -> Any:
    """A content block without what a client moves or fills in on resend: cache breakpoints
    (they follow the newest turn) and null fields (SDKs echo optional keys as null)."""
    if not isinstance(block, dict) or not ("cache_control" in block or None in block.values()):
        return block
    return {k: v for k, v in block.items() if k != "cache_control" and v is not None}


def chain_hash(parent_chain: str, body: dict[str, Any]) -> str:
    """Hash of a path: the parent's chain plus this message."""
    return _link(parent_chain, message_hash(body))


def _link(parent_chain: str, identity: bytes) -> str:
    return hashlib.blake2b(bytes.fromhex(parent_chain) + identity, digest_size=16).hexdigest()


ROOT_CHAIN = ""


@dataclass
class Plan:
    """What to send upstream and what to record, given the stored tree and a request."""

    upstream_messages: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]  # incoming messages not yet stored, to record in order
    parent: Message | None  # stored message the new ones attach to
    restored: int = 0  # stored messages put back in front of what the client sent
    branched: bool = False  # the new messages start a branch off the active path
    replayed: bool = False  # nothing new: the client resent a history already stored
    notes: list[str] = field(default_factory=list)
    path: list[Message] | None = None  # the stored path from the root to ``parent``, when known
    gaps: list[Gap] = field(default_factory=list)  # lost messages inside the restored history


@dataclass(frozen=True)
class Gap:
    """Where the active path skips lost messages (quarantined: undecodable or tampered)."""

    after: int | None  # seq of the stored message the path resumes from (None: nothing before)
    before: int  # seq of the message whose parent is lost
    missing: tuple[int, ...]  # seqs between the two that are not stored

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.after, "before": self.before, "missing": list(self.missing)}


def active_path(messages: list[Message], head: int | None) -> list[Message]:
    """Messages from the root to ``head``, following parent links (across gaps, see walk)."""
    return walk(messages, head)[0]


def walk(messages: list[Message], head: int | None) -> tuple[list[Message], list[Gap]]:
    """The active path from the root to ``head``, and the gaps in it.

    A message whose parent is not stored (it was quarantined) does not end the path: it goes on
    from the newest earlier message of the same branch, so the valid messages before a lost one
    still reach the model, and the gap is reported instead of silently dropping them.
    """
    by_seq = {m.seq: m for m in messages}
    path: list[Message] = []
    gaps: list[Gap] = []
    seq = head
    while seq is not None and seq in by_seq:
        message = by_seq[seq]
        path.append(message)
        seq = message.parent
        if seq is not None and (seq >= message.seq or seq not in by_seq):  # a parent is always older
            bridge = _bridge(messages, message, seq)
            after = bridge.seq if bridge is not None else None
            missing = tuple(s for s in range(0 if after is None else after + 1, message.seq) if s not in by_seq)
            gaps.append(Gap(after, message.seq, missing))
            seq = after
    path.reverse()
    gaps.reverse()
    return path, gaps


def _bridge(messages: list[Message], orphan: Message, lost: int) -> Message | None:
    """The message an orphan's path most likely went through: the newest one before the lost
    parent on the orphan's branch (a branch's messages carry its number), else any older one."""
    limit = min(lost, orphan.seq)
    same = other = None
    for message in messages:
        if message.seq < limit:
            if message.branch == orphan.branch:
                same = message if same is None or message.seq > same.seq else same
            other = message if other is None or message.seq > other.seq else other
    return same or other


def broken_chains(messages: list[Message]) -> dict[int, str]:
    """Messages whose chain hash does not match their content: seq → why.

    Each message stores the hash of its path (its parent's chain + its own identity), so a body
    changed on disk no longer hashes to its chain, even when its record checksum was rewritten.
    A child is checked against its parent's stored chain and the recomputed one, so one edited
    message (or one edited chain) flags that message only, not everything after it.
    """
    by_seq = {m.seq: m for m in messages}
    computed: dict[int, str] = {}
    broken: dict[int, str] = {}
    for message in messages:  # in seq order: parents first
        parent = by_seq.get(message.parent) if message.parent is not None else None
        if message.parent is not None and parent is None:
            continue  # the parent is lost: nothing to check this one against
        stored_base = ROOT_CHAIN if parent is None else parent.chain
        try:
            identity = message_hash(message.body)
            chain = _link(stored_base, identity)
            if chain != message.chain and parent is not None and computed.get(parent.seq, stored_base) != stored_base:
                chain = _link(computed[parent.seq], identity)  # the parent's chain was the edited part
        except (TypeError, ValueError, AttributeError):  # a body or chain that cannot be hashed
            broken[message.seq] = "message cannot be hashed"
            continue
        computed[message.seq] = chain if chain == message.chain else _link(stored_base, identity)
        if chain != message.chain:
            broken[message.seq] = "chain hash mismatch: the message differs from what was recorded"
    return broken


def reconcile(stored: list[Message], head: int | None, incoming: list[dict[str, Any]], mode: str) -> Plan:
    """Decide how a request relates to what the session already holds.

    ``mode`` is the tenant's history policy: ``client`` trusts the client's history as sent;
    ``auto`` restores the stored history when the client sends only new messages (no assistant
    turns: an agent that restarted and forgot); ``proxy`` always treats the client's unknown
    messages as new turns appended to the stored history.
    """
    path, gaps = walk(stored, head)
    by_chain: dict[str, Message] | None = None
    parent: Message | None = None
    chain = ROOT_CHAIN
    matched = 0
    on_path = True  # every message matched so far is the active path's, from its root
    for body in incoming:
        if on_path and matched < len(path) and path[matched].body == body:
            # The usual case: the client resends what was recorded. Equal bodies hash alike,
            # so the stored message's chain is this one's; no hashing needed.
            candidate: Message | None = path[matched]
        else:
            if by_chain is None:
                by_chain = {m.chain: m for m in stored}
            candidate = by_chain.get(chain_hash(chain, body))
            if candidate is None:
                break
            on_path = on_path and matched < len(path) and candidate is path[matched]
        parent, chain, matched = candidate, candidate.chain, matched + 1
    remainder = incoming[matched:]
    head_message = path[-1] if path else None  # active_path starts at head (empty when head is unknown)
    # The stored path to ``parent`` when every match was on the active path (the context stage
    # reuses it instead of walking a long session's tree again).
    parent_path = path[:matched] if on_path and matched else None

    if not remainder:
        return Plan(list(incoming), [], parent, replayed=True, branched=bool(parent and parent.seq != head), path=parent_path)

    at_head = (parent is None and head_message is None) or (parent is not None and parent.seq == head)
    prefix_is_system_only = all(_is_system(b) for b in incoming[:matched])
    if at_head or head_message is None or mode == "client" or not prefix_is_system_only:
        return Plan(list(incoming), list(remainder), parent, branched=bool(stored) and not at_head, path=parent_path)

    # The client holds less than the store: either nothing (it restarted and sends only new
    # messages) or the tail of the conversation (it restarted earlier, or trims its own
    # history). Put the stored part it lacks back in front.
    stored_rest = [m for m in path if m.role not in _SYSTEM_ROLES]  # a stored message's role is its body's
    client_rest = [b for b in remainder if not _is_system(b)]
    overlap = _tail_overlap(stored_rest, client_rest)
    if overlap == 0 and mode == "auto" and any(b.get("role") in ("assistant", "tool") for b in client_rest):
        # A different conversation with assistant turns of its own: an edit, not amnesia.
        return Plan(list(incoming), list(remainder), parent, branched=True, path=parent_path)
    client_system = [b for b in incoming if _is_system(b)]
    stored_system = [m.body for m in path if m.role in _SYSTEM_ROLES] if len(stored_rest) < len(path) else []
    upstream = (client_system or stored_system) + [m.body for m in stored_rest] + client_rest[overlap:]
    plan = Plan(upstream, client_rest[overlap:], head_message, restored=len(path) - overlap, path=path, gaps=gaps)
    if client_system and stored_system and client_system != stored_system:
        plan.notes.append("system prompt differs from the stored one; sent the client's")
    if not plan.new_messages:
        plan.replayed = True
    return plan


def drop_reverted(stored: list[Message], incoming: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The client's history without the messages a rollback (or a fork's cut) reverted, and how
    many were dropped. An agent that keeps its own history resends them; forwarding them would
    silently undo the rollback. Walks the client's messages along the stored tree while they
    match; reverted messages that end the request are kept: the client is asking them again."""
    by_chain = {m.chain: m for m in stored}
    chain, reverted, cut = ROOT_CHAIN, [], False
    for index, body in enumerate(incoming):
        found = by_chain.get(chain_hash(chain, body))
        if found is None:
            break
        chain = found.chain
        cut = cut or found.reverted  # what descends from a reverted message is gone with it
        if cut:
            reverted.append(index)
    tail = len(incoming)
    while reverted and reverted[-1] == tail - 1:  # a trailing run: asked again, not resent history
        tail = reverted.pop()
    if not reverted:
        return incoming, 0
    skip = set(reverted)
    return [body for index, body in enumerate(incoming) if index not in skip], len(skip)


_SYSTEM_ROLES = ("system", "developer")


def _is_system(body: dict[str, Any]) -> bool:
    return body.get("role") in _SYSTEM_ROLES


def _tail_overlap(stored: list[Message], client: list[dict[str, Any]]) -> int:
    """Length of the longest run that ends the stored path and begins the client's messages."""
    if not stored or not client:
        return 0
    tail = stored[-len(client):]  # a longer run cannot begin the client's messages
    hashes: dict[int, bytes] = {}  # index into client → hash, computed only when bodies differ

    def same(message: Message, index: int) -> bool:
        body = client[index]
        if message.body == body:
            return True
        if index not in hashes:
            hashes[index] = message_hash(body)
        return message_hash(message.body) == hashes[index]

    for start in range(len(tail)):
        if all(same(tail[start + i], i) for i in range(len(tail) - start)):
            return len(tail) - start
    return 0
