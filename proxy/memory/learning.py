"""What the memory service calls to learn and forget: background extraction (extraction.py,
supersede.py) and the backfill of sessions recorded before it was on (backfill.py), per-type
expiry, and erasure of a user or of rolled-back turns (expiry.py). One object, so the service
needs a few hook lines only (recall's: validity.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from proxy.jobs import Claims
from proxy.memory import expiry
from proxy.memory.backfill import Backfill
from proxy.memory.extraction import Extractor
from proxy.records import Message

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService

log = logging.getLogger("agent_state_proxy.memory")


class Learning:
    def __init__(self, service: MemoryService, claims: Claims, *, sweep_interval: float = 60.0) -> None:
        self.service = service
        self.extractor = Extractor(service, claims)
        self.backfill = Backfill(self.extractor)
        self.sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.extractor.start()
        for tenant in self.service.tenants:
            self.backfill.start(tenant)
        if any(s.ttl.configured() for s in self.service.settings.values()):
            self._sweeper = asyncio.create_task(self._sweep(), name="memory-expiry")

    def turned_on(self, tenants: list[str]) -> None:
        """A configuration reload turned extraction (or its backfill) on for these tenants."""
        self.extractor.start()
        for tenant in tenants:
            self.backfill.start(tenant)

    async def close(self) -> None:
        await self.backfill.close()
        await self.extractor.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def drain(self) -> None:
        await self.extractor.drain()  # (not the backfill: it may take hours; backfill.drain waits for it)

    def after_record(self, turn: Any, messages: list[Message]) -> None:
        self.extractor.schedule(turn, messages)

    async def forget_reverted(self, tenant: str, session: str, seqs: set[int]) -> int:
        state = self.service.tenants.get(tenant)
        return await expiry.forget_reverted(state, self.service.store, session, seqs) if state is not None else 0

    async def forget_user(self, tenant: str, user: str) -> dict[str, Any]:
        return await expiry.forget_user(self.service.tenants[tenant], self.service.store, user)

    async def sweep(self) -> int:
        return sum([await expiry.sweep(state, self.service.store) for state in list(self.service.tenants.values())])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("memory: the expiry sweep failed")
