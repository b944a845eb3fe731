"""Background deletion of sessions whose time-to-live has run out."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterable

from proxy.config import TenantConfig
from proxy.lifecycle import is_expired
from proxy.storage.base import Store

log = logging.getLogger("agent_state_proxy.janitor")


OnDelete = Callable[[str, str], Awaitable[None]]


async def sweep(store: Store, tenants: Iterable[TenantConfig], now: float, on_delete: OnDelete | None = None) -> int:
    """Delete every expired session of every tenant; returns how many were deleted.

    ``on_delete(tenant, session_id)`` runs after each deletion (SessionLifecycle.forget: long-term
    memory and the context's caches let the session go).
    """
    deleted = 0
    for tenant in tenants:
        for session in await store.list_sessions(tenant.name):
            if is_expired(tenant, session, now):
                deleted += await store.delete_session(tenant.name, session.id)
                if on_delete is not None:
                    await on_delete(tenant.name, session.id)
    return deleted


async def run(store: Store, tenants: Iterable[TenantConfig], interval: float, clock: Callable[[], float] = time.time, *, on_delete: OnDelete | None = None) -> None:
    tenants = list(tenants)
    while True:
        await asyncio.sleep(interval)
        try:
            deleted = await sweep(store, tenants, clock(), on_delete)
            if deleted:
                log.info("janitor deleted %d expired sessions", deleted)
        except Exception:  # the janitor must outlive a bad sweep; the next one retries
            log.exception("janitor sweep failed")
