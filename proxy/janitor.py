"""Background deletion of sessions whose time-to-live has run out (once per fleet: proxy/jobs.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncContextManager, Awaitable, Callable, Iterable

from proxy.config import TenantConfig
from proxy.errors import Conflict
from proxy.jobs import Claims
from proxy.lifecycle import is_expired
from proxy.storage.base import Store

log = logging.getLogger("agent_state_proxy.janitor")


OnDelete = Callable[[str, str], Awaitable[None]]
# (tenant, session id, refuse when busy) -> the session's one-writer lock (Pipeline.hold)
Hold = Callable[[str, str, bool], AsyncContextManager[None]]


async def sweep(store: Store, tenants: Iterable[TenantConfig], now: float, on_delete: OnDelete | None = None,
                hold: Hold | None = None) -> int:
    """Delete every expired session of every tenant; returns how many were deleted.

    ``on_delete(tenant, session_id)`` runs after each deletion (long-term memory forgets the session).
    With ``hold``, a session is deleted under its lock and only if still expired then: one a
    request is using (on any replica of a fleet) or has just renewed is kept.
    """
    deleted = 0
    for tenant in tenants:
        expired = [s for s in await store.list_sessions(tenant.name) if is_expired(tenant, s, now)]
        if expired:
            log.info("janitor: deleting %d expired sessions of tenant %s", len(expired), tenant.name)
        for session in expired:
            if hold is None:
                gone: bool | None = await store.delete_session(tenant.name, session.id)
            else:
                gone = await _delete_if_idle(store, tenant, session.id, now, hold)
            if gone is None:
                continue  # in use, or renewed since it was listed
            deleted += gone
            if on_delete is not None:
                await on_delete(tenant.name, session.id)
    return deleted


async def _delete_if_idle(store: Store, tenant: TenantConfig, session_id: str, now: float, hold: Hold) -> bool | None:
    """Delete an expired session under its lock; None when a request holds it or renewed it."""
    try:
        async with hold(tenant.name, session_id, True):
            current = await store.get_session(tenant.name, session_id)
            if current is not None and not is_expired(tenant, current, now):
                return None
            return await store.delete_session(tenant.name, session_id)
    except Conflict:
        return None


async def run(store: Store, tenants: Iterable[TenantConfig], interval: float, clock: Callable[[], float] = time.time, *,
              on_delete: OnDelete | None = None, claims: Claims | None = None, hold: Hold | None = None) -> None:
    """Sweep every ``interval`` seconds; in a fleet, only while this replica holds the janitor's
    claim (a replica that finds it held skips that sweep: the holder does the work)."""
    tenants = list(tenants)
    claims = claims or Claims()
    while True:
        await asyncio.sleep(interval)
        try:
            async with claims.claim("janitor") as granted:
                if not granted:
                    continue
                deleted = await sweep(store, tenants, clock(), on_delete, hold)
            if deleted:
                log.info("janitor deleted %d expired sessions", deleted)
        except Exception:  # the janitor must outlive a bad sweep; the next one retries
            log.exception("janitor sweep failed")
