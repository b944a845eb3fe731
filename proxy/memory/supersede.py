"""Where an extracted memory goes: new, merged into the same or a near-identical one, or
superseding an older memory about the same subject. Enforced through the store:

* an extracted memory's id is derived from tenant, user and its normalised text, so the same
  fact written twice (two workers, a retry, a restart) is one record, not two;
* a near-duplicate (cosine >= ``NEAR_DUPLICATE`` to one of the user's extracted memories of the
  same type, no other subject) is merged into it: its sources grow, its time is refreshed;
* a memory that ``replaces`` another (the extractor says which, by id or subject key) or fills
  the same subject (a ``memory_subject`` record names the subject's current memory) supersedes
  it: in one transaction the new memory is written, the old one leaves the recallable memories
  and is kept as a ``memory_superseded`` record with ``superseded_by`` and ``valid_to``;
* time is when a memory was stated (the time of its messages), not when it was extracted: a
  statement older than the current memory it would replace (a backfilled session's, extracted
  after newer ones) does not supersede it and is not stored (``outdated``).

Extracted memories are records of the session they were first extracted from: whatever erases
that session erases them (and their superseded predecessors) in the same transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from proxy.memory.extract_rules import Candidate, normal_subject
from proxy.memory.model import KIND, Memory, Scope
from proxy.memory.tenant import TenantMemory
from proxy.storage.base import Record, Store, Write

SUBJECT_KIND = "memory_subject"  # tenant-wide, key: hash of user and subject -> the subject's current memory
SUPERSEDED_KIND = "memory_superseded"  # session-scoped like the memory it was: the audit trail
NEAR_DUPLICATE = 0.93  # cosine above which two extracted memories of a user say the same
_MAX_SOURCES = 20


class Host(Protocol):
    """What consolidation needs from the memory service."""

    store: Store

    def memory(self, tenant: str) -> TenantMemory: ...
    async def embed(self, tenant: str, text: str) -> tuple[np.ndarray | None, str | None]: ...
    def allocate_key(self, tenant: str) -> int: ...
    def insert(self, tenant: str, memories: list[Memory]) -> None: ...
    def forget(self, tenant: str, ids: list[str]) -> None: ...


@dataclass
class Outcome:
    added: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    superseded: list[tuple[str, str]] = field(default_factory=list)  # (old id, new id)
    over_quota: int = 0  # new memories not stored: the tenant's memory quota is used up
    outdated: int = 0  # not stored: older than the memory they would have superseded

    def log(self) -> dict[str, Any]:
        return {"added": self.added, "merged": self.merged, "superseded": [list(p) for p in self.superseded],
                "over_quota": self.over_quota, "outdated": self.outdated}


def owner(user: str | None, session: str) -> str:
    """Whose extracted memories these are: the user's, or without a user id its session's only
    (anonymous sessions share nothing, docs/MEMORY.md)."""
    return f"user\0{user}" if user is not None else f"session\0{session}"


def extracted_id(tenant: str, owner: str, text: str) -> str:
    normal = " ".join(text.lower().split())
    seed = f"extracted\0{tenant}\0{owner}\0{normal}".encode("utf-8", "surrogatepass")
    return "mem_" + hashlib.blake2b(seed, digest_size=10).hexdigest()


def subject_key(owner: str, subject: str) -> str:
    return hashlib.blake2b(f"{owner}\0{subject}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Consolidator:
    def __init__(self, host: Host) -> None:
        self.host = host
        # Serialises a tenant's consolidations in this process (the ids make a race harmless,
        # this only avoids embedding the same text twice).
        self._locks: dict[str, asyncio.Lock] = {}

    async def apply(self, tenant: str, user: str | None, session: str, created: float, by: str,
                    candidates: list[Candidate], quota: int | None = None) -> Outcome:
        """Store ``candidates``; ``quota``: the most memories the tenant may hold (merging and
        superseding never add one)."""
        outcome = Outcome()
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            for candidate in candidates:
                await self._one(tenant, user, session, created, by, candidate, outcome, quota)
        return outcome

    async def _one(self, tenant: str, user: str | None, session: str, created: float, by: str,
                   candidate: Candidate, outcome: Outcome, quota: int | None) -> None:
        host, mem = self.host, self.host.memory(tenant)
        whose = owner(user, session)
        memory_id = extracted_id(tenant, whose, candidate.text)
        source = {"session": session, "created": created, "seqs": candidate.seqs}
        stated = candidate.stated if candidate.stated is not None else time.time()
        if memory_id in mem.ids:
            if await self._merge(tenant, memory_id, source, stated):
                outcome.merged.append(memory_id)
            return
        if candidate.replaces and not candidate.replaces.startswith("mem_") and not candidate.subject:
            candidate.subject = normal_subject(candidate.replaces)  # the extractor named a subject
        vector, model = await host.embed(tenant, candidate.text)
        old = await self._replaced(tenant, user, session, candidate, memory_id)
        if old is None and vector is not None:
            twin = await self._near_duplicate(tenant, user, session, candidate, vector)
            if twin is not None:
                if await self._merge(tenant, twin, source, stated):
                    outcome.merged.append(twin)
                return
        if old is not None and stated < old[0].ts:
            outcome.outdated += 1  # the memory it would replace was stated later: it stays current
            return
        if old is None and quota is not None and mem.alive >= quota:
            outcome.over_quota += 1
            return
        now = stated
        subject = candidate.subject or (old[0].subject if old else None)
        memory = Memory(id=memory_id, type=candidate.type, text=candidate.text, ts=now, key=host.allocate_key(tenant),
                        user=user, session=session, session_created=created, metadata={"kind": candidate.kind},
                        extracted=by, sources=[source], subject=subject, supersedes=[old[0].id] if old else None)
        memory.vector, memory.model = vector, model
        records = memory.records()
        if subject:
            records.append(Record(SUBJECT_KIND, subject_key(whose, subject), {"id": memory_id, "session": session, "user": user}))
        if old is not None:
            previous, value = old
            records += Memory.erasure(previous.id, previous.session)
            records.append(Record(SUPERSEDED_KIND, previous.id, value | {"superseded_by": memory_id, "valid_to": now}, previous.session))
        await host.store.apply([Write(tenant, records=records)])
        host.insert(tenant, [memory])
        outcome.added.append(memory_id)
        if old is not None:
            host.forget(tenant, [old[0].id])
            outcome.superseded.append((old[0].id, memory_id))

    async def read(self, tenant: str, memory_id: str) -> tuple[Memory, dict[str, Any]] | None:
        """A live memory and its stored record."""
        mem = self.host.memory(tenant)
        slot = mem.ids.slot(memory_id)
        if slot is None:
            return None
        value = await self.host.store.get_record(tenant, KIND, memory_id, mem.where[slot][0])
        if value is None:
            return None
        try:
            return Memory.from_record(value, with_vector=False), value
        except (ValueError, KeyError, TypeError):
            return None

    async def _replaced(self, tenant: str, user: str | None, session: str, candidate: Candidate,
                        memory_id: str) -> tuple[Memory, dict[str, Any]] | None:
        """The user's extracted memory this one supersedes: the one the extractor names, or the
        current one of its subject."""
        ids = [candidate.replaces] if candidate.replaces and candidate.replaces.startswith("mem_") else []
        if candidate.subject:
            current = await self.host.store.get_record(tenant, SUBJECT_KIND, subject_key(owner(user, session), candidate.subject))
            if current and isinstance(current.get("id"), str):
                ids.append(current["id"])
        for old_id in ids:
            found = await self.read(tenant, old_id) if old_id != memory_id else None
            if found is not None and _same_owner(found[0], user, session):
                return found
        return None

    async def _near_duplicate(self, tenant: str, user: str | None, session: str, candidate: Candidate,
                              vector: np.ndarray) -> str | None:
        mem = self.host.memory(tenant)
        scope = Scope("user", user, None) if user is not None else Scope("session", None, session)
        slots, sims = mem.dense(vector, scope, mem.admit(scope, (candidate.type,)), 3)
        for slot, sim in zip(slots.tolist(), sims.tolist()):
            if sim < NEAR_DUPLICATE:
                break
            found = await self.read(tenant, mem.ids[slot] or "")
            if found is None:
                continue
            other = found[0]
            if _same_owner(other, user, session) and (not other.subject or not candidate.subject or other.subject == candidate.subject):
                return other.id
        return None

    async def _merge(self, tenant: str, memory_id: str, source: dict[str, Any], stated: float) -> bool:
        """Add ``source`` to a stored memory and refresh its time (it was stated again, at ``stated``)."""
        found = await self.read(tenant, memory_id)
        if found is None:
            return False
        memory, value = found
        sources = [dict(s) for s in value.get("sources") or [] if isinstance(s, dict)]
        same = next((s for s in sources if s.get("session") == source["session"] and s.get("created") == source["created"]), None)
        if same is not None:
            same["seqs"] = sorted(set(same.get("seqs") or []) | set(source["seqs"]))
        elif len(sources) < _MAX_SOURCES:
            sources.append(source)
        now = max(stated, memory.ts)
        await self.host.store.apply([Write(tenant, records=[Record(KIND, memory_id, value | {"sources": sources, "ts": now}, memory.session)])])
        mem = self.host.memory(tenant)
        slot = mem.ids.slot(memory_id)
        if slot is not None:
            mem.cols.ts[slot] = now  # recency and expiry count from the latest statement
        return True


def _same_owner(memory: Memory, user: str | None, session: str) -> bool:
    """An extracted memory of the same user (without a user id: of the same session)."""
    return bool(memory.extracted) and memory.user == user and (user is not None or memory.session == session)
