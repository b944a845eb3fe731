"""Background deletion of sessions whose time-to-live has run out."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from proxy.config import TenantConfig
from proxy.storage.base import Store

log = logging.getLogger("agent_state_proxy.janitor")


async def sweep(store: Store, tenants: Iterable[TenantConfig], now: float) -> int:
    """Delete every expired session of every tenant; returns how many were deleted."""
    deleted = 0
    for tenant in tenants:
        for session in await store.list_sessions(tenant.name):
            if session.last_active + tenant.session_ttl < now:
                deleted += await store.delete_session(tenant.name, session.id)
    return deleted


async def run(store: Store, tenants: Iterable[TenantConfig], interval: float, clock: Callable[[], float] = time.time) -> None:
    tenants = list(tenants)
    while True:
        await asyncio.sleep(interval)
        try:
            deleted = await sweep(store, tenants, clock())
            if deleted:
                log.info("janitor deleted %d expired sessions", deleted)
        except Exception:  # the janitor must outlive a bad sweep; the next one retries
            log.exception("janitor sweep failed")
