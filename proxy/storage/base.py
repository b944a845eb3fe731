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


# A write's stored bytes: its session's, its messages', its records' (None: a deletion).
Encoded = tuple[bytes | None, list[bytes], list[bytes | None]]


@dataclass
class Write:
    """One unit of a transaction: a session upsert, its new or changed messages, records.

    ``encoded``: its bytes, already made by ``Store.check`` for a copy that nothing changes
    afterwards (write-behind's queued copies), so that committing it does not encode it again."""

    tenant: str
    session: Session | None = None
    messages: Sequence[Message] = ()
    records: Sequence[Record] = ()
    delete_session: str | None = None
    encoded: Encoded | None = field(default=None, repr=False, compare=False)


@dataclass
class Quarantined:
    tenant: str
    key: str
    reason: str
    ts: float
    raw_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def encode(write: Write) -> Encoded:
    """The stored bytes of a write's parts (made once: ``write.encoded`` when set); InvalidWrite,
    naming the part, for a value no store can keep."""
    if write.encoded is not None:
        return write.encoded
    session = _encode(write.session, "session") if write.session is not None else None
    messages = [_encode(m, f"message {m.seq} ({m.role})") for m in write.messages]
    records = [None if r.value is None else _encode(r.value, f"{r.kind} record") for r in write.records]
    return session, messages, records


def _encode(value: Any, part: str) -> bytes:
    try:
        return codec.encode(value)
    except codec.Unstorable as exc:
        raise InvalidWrite(f"{part} cannot be stored: {exc}") from None


class Store(ABC):
    """Tenant-scoped storage of sessions, their messages and auxiliary records.

    Every method takes the tenant explicitly and never returns another tenant's data.
    ``apply`` is one transaction. A durable one is committed (or failed loudly with
    StorageError) when it returns; a routine one (``durable=False``) may be committed later, in
    order, before any write made after it, and every read of the same store sees it at once
    (backends that buffer nothing commit it at once). A stored record that cannot be decoded is
    quarantined (moved aside and reported), never returned and never allowed to crash a read.
    Every backend (in-memory, LMDB, PostgreSQL) and the write-behind store over each answers
    exactly this interface: tests/test_storage.py runs the same suite on all of them.
    """

    # True when other processes write the same sessions (PostgreSQL with replicas: many): the
    # pipeline then also takes session_lock, and nothing may be cached across requests.
    shared = False

    def session_lock(self, tenant: str, session_id: str, refuse: bool) -> AsyncContextManager[None]:
        """Hold the session against every other process for the block (only used when ``shared``);
        ``refuse``: raise SessionBusy instead of waiting when another holds it."""
        return contextlib.nullcontext()

    @abstractmethod
    async def apply(self, writes: Sequence[Write], durable: bool = True) -> None:
        """Commit ``writes`` as one transaction; ``durable=False``: a routine write that may be
        batched with later ones (InvalidWrite is still raised now, never later)."""

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

    def check(self, writes: Sequence[Write]) -> list[Encoded]:
        """Raise InvalidWrite, naming the part, if a write could never be committed (``apply``
        raises the same by itself: this is for a caller that commits later). Returns each
        write's bytes, for a copy of it that ``apply`` then need not encode again."""
        return [encode(write) for write in writes]

    @abstractmethod
    async def quarantine_messages(self, tenant: str, session_id: str, reasons: dict[int, str]) -> None:
        """Move messages that decode but cannot be trusted (``seq`` → why) aside, as a corrupt
        record would be: kept for inspection, never returned again."""

    def damage(self) -> str | None:
        """Why the store itself is damaged (reads or writes cannot be trusted), or None."""
        return None

    def health(self) -> str | None:
        """Why the store cannot take writes now (readiness), or None when it can."""
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

    def stats(self) -> dict[str, Any]:
        return {}

    def memory_feed(self) -> Any:
        """The fleet's memory change log (PostgreSQL with replicas: many), or None."""
        return None
