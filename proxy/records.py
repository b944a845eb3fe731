"""The records the proxy stores: sessions and the messages of their transcripts."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OUTCOMES = ("ok", "error", "aborted")


@dataclass(slots=True)
class Message:
    """One message of a session's transcript, as recorded.

    Transcripts are trees: every message points at its parent, so an edited or regenerated
    history becomes a branch instead of overwriting what was recorded. ``chain`` is a hash of
    the whole path up to and including this message, which is how a resent history is matched
    against what is already stored.
    """

    seq: int  # unique and increasing within the session; also the storage key
    parent: int | None  # seq of the previous message on this path (None for the first)
    chain: str  # hex hash of the path root..this message
    role: str
    body: dict[str, Any]  # the OpenAI message exactly as sent or received
    ts: float
    tokens: int = 0
    tokenizer: str | None = None  # the encoding ``tokens`` was counted with (None: unknown)
    request_id: str = ""
    branch: int = 0  # 0 for the first line of the conversation, +1 for every divergence
    model: str | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    outcome: str = "ok"  # ok | error | aborted
    alternatives: list[dict[str, Any]] | None = None  # the other choices when n > 1
    tags: list[str] | None = None  # importance: decision, commitment, preference, fact, ...
    reverted: bool = False  # rolled back: kept for audit, excluded from context and memory
    injected: list[str] | None = None  # memory ids injected into the request that produced this
    usage: dict[str, int] | None = None  # that request's tokens: prompt, completion, cached, sent, full
    protocol: str | None = None  # the client protocol that sent or received it, when not Chat Completions ("responses", ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        values = {name: data[name] for name in _MESSAGE_FIELDS if name in data}
        # Decoded transcripts stay cached (storage/write_behind.py): one string per distinct
        # role, model, tokenizer... instead of one per message (saving: docs/BENCHMARKS.md).
        for name in _INTERNED:
            if isinstance(value := values.get(name), str):
                values[name] = sys.intern(value)
        body = values.get("body")
        if isinstance(body, dict) and isinstance(role := body.get("role"), str):
            body["role"] = sys.intern(role)
        return cls(**values)


def share_repeated_values(messages: list[Message]) -> list[Message]:
    """Make the values a decoded transcript repeats one object each, in place: a message's
    parent is the seq of one before it, a request's messages share its id. Decoded transcripts
    stay cached (storage/write_behind.py), and the copies cost ~80 bytes a message (~8 %)."""
    seqs: dict[int, int] = {}
    request_ids: dict[str, str] = {}
    for message in messages:
        seqs[message.seq] = message.seq
        if message.parent is not None:
            message.parent = seqs.get(message.parent, message.parent)
        message.request_id = request_ids.setdefault(message.request_id, message.request_id)
    return messages


_MESSAGE_FIELDS = tuple(f.name for f in fields(Message))
_INTERNED = ("role", "tokenizer", "model", "finish_reason", "outcome")


@dataclass(slots=True)
class Session:
    """A session's metadata; its messages are stored separately, one record each."""

    tenant: str
    id: str
    created_at: float
    last_active: float
    user_id: str | None = None
    implicit: bool = False  # inferred from the conversation rather than named by the client
    head: int | None = None  # seq of the newest message on the active branch
    next_seq: int = 0
    branches: int = 0
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
