"""What the parts of the memory service share about one tenant: its settings, searchable
structures, embedder, counters and readiness, and the queue of index changes.

The recall, API, indexer, loader and index worker each receive the ``TenantState`` of a
tenant; none of them holds per-tenant dicts of its own. ``insert`` and ``forget`` are the one
place that keeps the in-memory structures and the usearch index (through the op queue) in step.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from proxy.config import MemorySettings, TenantConfig
from proxy.memory.embedder_slots import EmbedderSlot
from proxy.memory.model import ANONYMOUS_USER, PROCEDURAL, Memory, Scope
from proxy.memory.ops import AddVectors, IndexOp, RemoveVectors
from proxy.memory.tenant import TenantMemory

_LATENCY_WINDOW = 2000  # recalls kept for the admin percentiles


@dataclass(eq=False)
class TenantState:
    name: str
    settings: MemorySettings
    config: TenantConfig
    embedder: EmbedderSlot  # shared by the tenants that use the same local model
    ops: asyncio.Queue[IndexOp]  # the one queue of the index worker
    memory: TenantMemory = field(init=False)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # loaded from LMDB
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_LATENCY_WINDOW))  # recalls, ms
    embedding_latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_LATENCY_WINDOW))
    procedural: dict[str, str] = field(default_factory=dict)  # id -> text of API procedural memories
    dirty: bool = False  # the index changed since it was last saved
    opening: bool = False  # the saved index is not opened yet: the open takes every vector from the copies
    sessions_forgotten: int = 0  # forget_session calls so far (an indexing batch checks it)
    fleet: bool = False  # a cache of PostgreSQL that other replicas write too (proxy/memory/fleet_sync.py)

    def __post_init__(self) -> None:
        self.memory = TenantMemory(self.name)

    @property
    def model_name(self) -> str:
        return self.embedder.model_name

    def user(self, user: str | None) -> str | None:
        """Whose memories a request without a user id sees (anonymous="shared": one shared user)."""
        if user is None and self.settings.anonymous == "shared":
            return ANONYMOUS_USER
        return user

    def scope_for(self, user: str | None, session: str) -> Scope:
        if user is None:
            # Without a user id the session is the only safe boundary (anonymous="shared" maps
            # requests without one to a single tenant-wide anonymous user instead).
            return Scope("session", None, session)
        return Scope(self.settings.scope, user, session)

    def allocate_key(self) -> int:
        key = self.memory.next_key
        self.memory.next_key += 1
        return key

    def insert(self, memories: Iterable[Memory], *, index: bool = True) -> None:
        """Make memories searchable; with ``index``, queue their vectors for the usearch index
        (loading does not: the index is opened or rebuilt from the copies afterwards)."""
        mem = self.memory
        keys, vectors = [], []
        for memory in memories:
            if self.fleet and memory.id in mem.ids:
                continue  # the fleet's change log brought it before its writer got here
            mem.insert(memory)
            if memory.type == PROCEDURAL:
                self.procedural[memory.id] = memory.text
            if index and memory.vector is not None and mem.mirror is not None and len(memory.vector) == mem.mirror.dim:
                keys.append(memory.key)
                vectors.append(memory.vector)
        if keys:
            self.ops.put_nowait(AddVectors(self.name, np.array(keys, dtype=np.uint64), np.stack(vectors)))

    def attach_vectors(self, memories: Iterable[Memory]) -> None:
        """Memories stored without a vector got one: add it to the copies and queue it for the index."""
        keys, vectors = [], []
        for memory in memories:
            if memory.vector is None or memory.id not in self.memory.unembedded:
                continue  # nothing to attach, or forgotten, or attached already
            if self.memory.attach_vector(memory.id, memory.vector) is not None:
                keys.append(memory.key)
                vectors.append(memory.vector)
        if keys:
            self.ops.put_nowait(AddVectors(self.name, np.array(keys, dtype=np.uint64), np.stack(vectors)))

    def forget(self, ids: Iterable[str]) -> None:
        """Drop memories from the structures and queue their removal from the index."""
        keys = []
        for memory_id in ids:
            key = self.memory.remove(memory_id)
            self.procedural.pop(memory_id, None)
            if key is not None:
                keys.append(key)
        if keys:
            self.ops.put_nowait(RemoveVectors(self.name, tuple(keys)))


def reverted(session: Any) -> set[int]:
    """The seqs of a session's messages that a rollback reverted (their memories must go)."""
    return {int(seq) for entry in (session.extra or {}).get("rollbacks", []) if isinstance(entry, dict)
            for seq in entry.get("reverted", []) if isinstance(seq, int)}
