"""What a memory is, how it is stored as a Record, and who may see it (scopes)."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proxy.message_text import message_text as shared_message_text
from proxy.storage.base import Record

KIND = "memory"  # Record kind of every memory; session-scoped for memories of a session
# Its vector is a record of its own (same key, same scope): a recall reads back the text of a
# handful of memories, and with the vector beside it an LMDB page held far fewer records, so
# recalls mapped more of the file (the process's RSS; docs/MEMORY.md, Storage).
VECTOR_KIND = "memory_vector"
EPISODIC, SEMANTIC, PROCEDURAL = "episodic", "semantic", "procedural"
TYPES = (EPISODIC, SEMANTIC, PROCEDURAL)
SCOPES = ("user", "session", "tenant")
ANONYMOUS_USER = "\x00anonymous"  # never a valid X-User-ID (not printable): cannot be spoofed
_MAX_CALL_ARGUMENTS = 500  # of a tool call, in a memory's text


@dataclass
class Memory:
    """One remembered item: a recorded message (episodic), a fact or document (semantic), or a
    standing preference or procedure (procedural)."""

    id: str
    type: str
    text: str
    ts: float
    key: int  # usearch key, never reused within the tenant
    user: str | None = None  # None: visible to every user of the tenant
    session: str | None = None  # set: erased with that session
    session_created: float | None = None  # tells a session apart from a later one with the same id
    seq: int | None = None  # the recorded message, for episodic memories
    role: str | None = None
    name: str | None = None  # the speaker's name when the message carried one
    context: str | None = None  # the message this one answered: indexed with it, never injected
    metadata: dict[str, Any] | None = None
    model: str | None = None  # embedder that produced ``vector``
    vector: np.ndarray | None = field(default=None, repr=False)
    embedded: bool = False  # stored with a vector (even when ``vector`` was not decoded)
    # Extracted memories (proxy/memory/extraction.py): how, from which turns, about what.
    extracted: str | None = None  # "rules" or the extractor model's alias
    sources: list[dict[str, Any]] | None = None  # [{"session", "created", "seqs"}], the first is where it is stored
    subject: str | None = None  # what it is about ("user.city"): a newer fact on it supersedes this one
    supersedes: list[str] | None = None  # ids of the memories this one replaced (kept for audit)

    def to_record(self) -> dict[str, Any]:
        """The memory's record, without its vector (see ``vector_record``)."""
        value: dict[str, Any] = {
            "id": self.id, "type": self.type, "text": self.text, "ts": self.ts, "key": self.key,
            "user": self.user, "session": self.session, "session_created": self.session_created,
            "seq": self.seq, "role": self.role, "name": self.name, "metadata": self.metadata,
        }
        if self.context:
            value["context"] = self.context
        if self.seq is not None:
            value["covers"] = [self.seq]  # lets a rollback find and drop what it reverts
        if self.vector is not None and self.model:
            value["model"] = self.model  # its vector is stored (VECTOR_KIND), by this embedder
        if self.extracted:
            value |= {"extracted": self.extracted, "sources": self.sources or [], "subject": self.subject,
                      "supersedes": self.supersedes or []}
        return value

    def vector_record(self) -> dict[str, Any] | None:
        """The value of its VECTOR_KIND record; None when it has no vector yet."""
        if self.vector is None or not self.model:
            return None
        # Half precision: the indexes keep 8 bits a component anyway, and the record stays
        # under LMDB's ~2 KB node limit (no overflow page of its own).
        return {"model": self.model, "vec16": base64.b64encode(np.asarray(self.vector, dtype="<f2").tobytes()).decode()}

    def records(self) -> list[Record]:
        """What stores it: its record and, once embedded, its vector's."""
        vector = self.vector_record()
        records = [Record(KIND, self.id, self.to_record(), self.session)]
        if vector is not None:
            records.append(Record(VECTOR_KIND, self.id, vector, self.session))
        return records

    @staticmethod
    def erasure(memory_id: str, session: str | None) -> list[Record]:
        """The writes that erase a stored memory: its record and its vector's."""
        return [Record(KIND, memory_id, None, session), Record(VECTOR_KIND, memory_id, None, session)]

    @classmethod
    def from_record(cls, value: dict[str, Any], with_vector: bool = True, vector_value: dict[str, Any] | None = None) -> Memory:
        """Decode a stored memory, with the value of its vector's record if given; ValueError
        (or KeyError/TypeError) when it is malformed."""
        source = vector_value or {}
        vector = None
        encoded = source.get("vec16")
        if encoded and with_vector:
            vector = np.frombuffer(base64.b64decode(encoded), dtype="<f2").astype(np.float32)
        if value["type"] not in TYPES or not isinstance(value["text"], str):
            raise ValueError("not a memory record")
        return cls(
            id=str(value["id"]), type=value["type"], text=value["text"], ts=float(value["ts"]), key=int(value["key"]),
            user=value.get("user"), session=value.get("session"), session_created=value.get("session_created"),
            seq=value.get("seq"), role=value.get("role"), name=value.get("name"), metadata=value.get("metadata"),
            context=value.get("context"),
            model=source.get("model") if vector is not None else None, vector=vector,
            embedded=bool(encoded or value.get("model")),
            extracted=value.get("extracted"), sources=value.get("sources"), subject=value.get("subject"),
            supersedes=value.get("supersedes"),
        )

    def public(self) -> dict[str, Any]:
        """The API view (no vector, no internal key)."""
        user = None if self.user == ANONYMOUS_USER else self.user
        return {
            "id": self.id, "object": "memory", "type": self.type, "content": self.text,
            "created_at": self.ts, "user_id": user, "session_id": self.session, "seq": self.seq,
            "role": self.role, "name": self.name, "metadata": self.metadata or {},
            "indexed": self.embedded or self.vector is not None,  # False: found by keywords only so far
        } | ({"extracted": {"by": self.extracted, "sources": self.sources or [], "subject": self.subject,
                            "supersedes": self.supersedes or []}} if self.extracted else {})


@dataclass(frozen=True)
class Scope:
    """Whose memories a retrieval may see.

    ``user``: the user's memories from all of their sessions; ``session``: this session's only;
    ``tenant``: every user's (only when the tenant configures it). In every scope the tenant-wide
    memories (added without a user) are visible, and in user and session scope the user's own
    session-less memories (added through the API) are too.
    """

    kind: str
    user: str | None
    session: str | None

    def describe(self) -> str:
        return self.kind


def episodic_id(tenant: str, session: str, created: float, seq: int) -> str:
    seed = f"{tenant}\0{session}\0{created!r}\0{seq}".encode("utf-8", "surrogatepass")
    return "mem_" + hashlib.blake2b(seed, digest_size=10).hexdigest()


def new_id() -> str:
    """Time-ordered (uuid7-style): 48-bit milliseconds then 32 random bits."""
    return "mem_" + f"{int(time.time() * 1000):012x}" + os.urandom(4).hex()


def text_hash(text: str) -> int:
    """Hash of a text with whitespace and case normalised, for de-duplication."""
    normal = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True)


def message_text(body: dict[str, Any]) -> str:
    """The text of a message worth remembering: what it says, each tool call's arguments capped."""
    return shared_message_text(body, max_arguments=_MAX_CALL_ARGUMENTS).strip()
