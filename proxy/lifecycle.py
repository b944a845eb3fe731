"""A session's lifecycle outside its turns: one writer at a time, expiry, deletion, rollback, fork.

Each change updates the store, long-term memory and the context stage's caches together, so no
caller has to remember that a deleted session's memories must be forgotten or that a rolled-back
turn's summaries must leave the cache. A session id can be reused after a deletion: what was
derived from a session (caches, background work) names the incarnation it belongs to by its
``created_at``, checked with ``same_session``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from proxy import rollback as rollbacks
from proxy.errors import Conflict, NotFound
from proxy.records import Session
from proxy.sessions import SessionLocks
from proxy.storage.base import SessionBusy, Store

if TYPE_CHECKING:
    from proxy.config import TenantConfig
    from proxy.context.manager import ContextManager
    from proxy.memory.service import MemoryService


def same_session(found: Session | None, created_at: float) -> bool:
    """Whether ``found`` (a session read again) is still the incarnation created at ``created_at``
    (not deleted meanwhile, nor deleted and created anew under the same id)."""
    return found is not None and found.created_at == created_at


def is_expired(tenant: TenantConfig, session: Session, now: float) -> bool:
    """Idle longer than the tenant's time-to-live: the next request starts it over."""
    return session.last_active + tenant.session_ttl < now


class SessionLifecycle:
    """Expire, delete, roll back and fork sessions; serialise each session's writers."""

    def __init__(self, store: Store, context: ContextManager | None = None) -> None:
        self.store = store
        self.context = context
        self.memory: MemoryService | None = None  # set by the app once long-term memory starts
        self.locks = SessionLocks()

    def hold(self, tenant: str, session_id: str, refuse_when_busy: bool):
        """One writer per session: this process's lock, and when other replicas share the store
        (fleet mode) the store's cross-replica lock inside it (a request waits here first, so a
        replica holds at most one store lock, one connection, per session)."""
        local = self.locks.hold(tenant, session_id, refuse_when_busy)
        if not self.store.shared:
            return local
        return self._hold_across_replicas(local, tenant, session_id, refuse_when_busy)

    @contextlib.asynccontextmanager
    async def _hold_across_replicas(self, local: Any, tenant: str, session_id: str, refuse: bool) -> AsyncIterator[None]:
        async with local:
            try:
                async with self.store.session_lock(tenant, session_id, refuse):
                    yield
            except SessionBusy:  # raised only while locking: a nested hold raises Conflict itself
                raise Conflict("another request of this session is in progress; retry when it completes") from None

    async def expire(self, tenant: TenantConfig, session: Session | None, now: float) -> Session | None:
        """``session`` while it lives; None once an expired one is deleted (call holding its lock)."""
        if session is None or not is_expired(tenant, session, now):
            return session
        await self.store.delete_session(tenant.name, session.id)
        await self.forget(tenant.name, session.id)
        return None

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Erase a session and everything derived from it; False when there was none."""
        async with self.hold(tenant, session_id, refuse_when_busy=False):
            deleted = await self.store.delete_session(tenant, session_id)
        await self.forget(tenant, session_id)  # also when the store had none: memory may still hold some
        return deleted

    async def forget(self, tenant: str, session_id: str) -> None:
        """After the store erased a session (its memories went with it): the index and the
        context's caches let it go too. The janitor calls this after each deletion."""
        if self.memory is not None:
            await self.memory.forget_session(tenant, session_id)
        if self.context is not None:
            self.context.forget(tenant, session_id)

    async def rollback(self, tenant: str, session_id: str, spec: dict[str, Any], now: float) -> dict[str, Any]:
        """Revert turns (``{"turns": N}`` or ``{"checkpoint": id}``): they leave the active path,
        the summaries that covered them and long-term memory, in that order."""
        async with self.hold(tenant, session_id, refuse_when_busy=False):
            session = await self._session(tenant, session_id)
            messages = await self.store.get_messages(tenant, session_id)
            report = await rollbacks.rollback(self.store, session, messages, spec, now)
        if self.context is not None:
            self.context.forget(tenant, session_id)  # its cached summaries may cover reverted turns
        if self.memory is not None:
            await self.memory.forget_messages(tenant, session_id, report["reverted"])
        return report

    async def fork(self, tenant: str, session_id: str, spec: dict[str, Any], now: float,
                   admit: Callable[[str], Awaitable[None]] | None = None) -> tuple[Session, Session]:
        """A new session with the source's active path up to the target (``spec``: ``session_id``,
        and ``turns`` or ``checkpoint``); ``admit(new_id)`` may refuse it (the tenant's quotas).
        Returns (source, forked)."""
        spec = spec | {"session_id": rollbacks.fork_id(spec)}
        new_id = spec["session_id"]
        async with self.hold(tenant, session_id, refuse_when_busy=False):
            if new_id == session_id:
                raise Conflict(f"session '{session_id}' already exists", code="session_exists")
            # The new id's lock too: a request in flight on it is creating that session, and its
            # record would overwrite the fork after the fork was acknowledged.
            if self.locks.busy(tenant, new_id):
                raise Conflict(f"session '{new_id}' is being created by a request in flight; fork to another id",
                               code="session_exists")
            async with self.hold(tenant, new_id, refuse_when_busy=True):
                if admit is not None:
                    await admit(new_id)
                source = await self._session(tenant, session_id)
                messages = await self.store.get_messages(tenant, session_id)
                forked = await rollbacks.fork(self.store, source, messages, spec, now)
        return source, forked

    async def _session(self, tenant: str, session_id: str) -> Session:
        session = await self.store.get_session(tenant, session_id)
        if session is None:
            raise NotFound(f"no session '{session_id}' for this tenant", code="session_not_found")
        return session
