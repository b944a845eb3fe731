"""The storage interface every backend implements; tests/test_storage.py checks it."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Sequence

from proxy import codec
from proxy.records import Message, Session


# What the log and /ready tell an operator to do about a damaged store (docs/PERSISTENCE.md).
REPAIR_HINT = ("stop the proxy, run `agent-state-proxy verify`, then `agent-state-proxy salvage --to DIR` "
               "or `agent-state-proxy restore --from BACKUP`")


class StorageError(Exception):
    """The store failed to persist or read (disk full, I/O error): fatal for the write."""


class InvalidWrite(ValueError):
    """A write no store could ever commit (a value that cannot be encoded or nests too deep):
    the fault of whoever made it. Refused before it is queued or acknowledged."""


class StoreDamaged(StorageError):
    """The store's own structure is damaged (a B-tree page is unreadable): no request can be
    trusted to it until an operator verifies, salvages or restores it (docs/PERSISTENCE.md)."""


class SessionBusy(Exception):
    """Another process holds the session's lock and the caller asked not to wait."""


@dataclass(frozen=True)
class Record:
    """An auxiliary record (checkpoint, summary, memory, idempotent response...).

    Session-scoped records (``session_id`` set) are erased with their session.
    ``value=None`` deletes the record.
    """

    kind: str
    key: str
    value: dict[str, Any] | None
    session_id: str | None = None


@dataclass
class Write:
    """One unit of a transaction: a session upsert, its new or changed messages, records."""

    tenant: str
    session: Session | None = None
    messages: Sequence[Message] = ()
    records: Sequence[Record] = ()
    delete_session: str | None = None


@dataclass
class Quarantined:
    tenant: str
    key: str
    reason: str
    ts: float
    raw_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Store(ABC):
    """Tenant-scoped storage of sessions, their messages and auxiliary records.

    Every method takes the tenant explicitly and never returns another tenant's data.
    ``apply`` is one transaction: durable (or failed loudly with StorageError) when it returns.
    A stored record that cannot be decoded is quarantined (moved aside and reported), never
    returned and never allowed to crash a read.
    """

    # True when other processes write the same sessions (PostgreSQL with replicas: many): the
    # pipeline then also takes session_lock, and nothing may be cached across requests.
    shared = False

    def session_lock(self, tenant: str, session_id: str, refuse: bool) -> AsyncContextManager[None]:
        """Hold the session against every other process for the block (only used when ``shared``);
        ``refuse``: raise SessionBusy instead of waiting when another holds it."""
        return contextlib.nullcontext()

    @abstractmethod
    async def apply(self, writes: Sequence[Write]) -> None: ...

    @abstractmethod
    async def get_session(self, tenant: str, session_id: str) -> Session | None: ...

    @abstractmethod
    async def get_messages(self, tenant: str, session_id: str) -> list[Message]:
        """All messages of a session, every branch, in ``seq`` order."""

    @abstractmethod
    async def list_sessions(self, tenant: str) -> list[Session]: ...

    @abstractmethod
    async def get_record(self, tenant: str, kind: str, key: str, session_id: str | None = None) -> dict[str, Any] | None: ...

    @abstractmethod
    async def scan_records(self, tenant: str, kind: str, session_id: str | None = None, prefix: str = "",
                           after: str = "", limit: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """Records of one kind (and session, if given) whose key starts with ``prefix``, in key order.

        Paged when ``limit`` > 0: at most ``limit`` records with keys after ``after``; an empty
        page means there are no more (a large kind is read without holding all of it at once).
        """

    @abstractmethod
    async def quarantined(self, tenant: str | None = None) -> list[Quarantined]: ...

    def check(self, writes: Sequence[Write]) -> None:
        """Raise InvalidWrite, naming the part, if a write could never be committed."""
        for write in writes:
            parts: list[tuple[str, Any]] = [("session", write.session)] if write.session is not None else []
            parts += [(f"message {m.seq} ({m.role})", m) for m in write.messages]
            parts += [(f"{r.kind} record", r.value) for r in write.records if r.value is not None]
            for name, value in parts:
                try:
                    codec.encode(value)
                except codec.Unstorable as exc:
                    raise InvalidWrite(f"{name} cannot be stored: {exc}") from None

    @abstractmethod
    async def quarantine_messages(self, tenant: str, session_id: str, reasons: dict[int, str]) -> None:
        """Move messages that decode but cannot be trusted (``seq`` → why) aside, as a corrupt
        record would be: kept for inspection, never returned again."""

    def damage(self) -> str | None:
        """Why the store itself is damaged (reads or writes cannot be trusted), or None."""
        return None

    # Conveniences over apply -------------------------------------------------------------

    async def commit(self, session: Session, messages: Sequence[Message], records: Sequence[Record] = ()) -> None:
        """Upsert the session, insert or overwrite ``messages`` and write ``records`` atomically."""
        await self.apply([Write(session.tenant, session, messages, records)])

    async def put_records(self, tenant: str, records: Sequence[Record]) -> None:
        await self.apply([Write(tenant, records=records)])

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        """Erase a session, its messages and its records; False when it did not exist."""
        existed = await self.get_session(tenant, session_id) is not None
        await self.apply([Write(tenant, delete_session=session_id)])
        return existed

    async def close(self) -> None:
        return None

    def release_mapped_pages(self) -> int:
        """After a bulk read, let go of what it mapped into the process (LMDB: the pages of its
        data file); 0 when there is nothing such."""
        return 0

    def stats(self) -> dict[str, Any]:
        return {}
