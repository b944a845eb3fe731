"""The storage interface every backend implements; tests/test_store_conformance.py checks it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from proxy.records import Message, Session


class Store(ABC):
    """Tenant-scoped storage of sessions and their messages.

    Every method takes the tenant explicitly and never returns another tenant's data.
    One write call is one transaction: it is durable (or has failed loudly) when it returns.
    """

    @abstractmethod
    async def get_session(self, tenant: str, session_id: str) -> Session | None: ...

    @abstractmethod
    async def get_messages(self, tenant: str, session_id: str) -> list[Message]:
        """All messages of a session, every branch, in ``seq`` order."""

    @abstractmethod
    async def commit(self, session: Session, messages: list[Message]) -> None:
        """Upsert the session record and insert ``messages`` (new seqs) atomically."""

    @abstractmethod
    async def delete_session(self, tenant: str, session_id: str) -> bool:
        """Erase a session and all its messages; False when it did not exist."""

    @abstractmethod
    async def list_sessions(self, tenant: str) -> list[Session]: ...

    async def close(self) -> None:
        return None
