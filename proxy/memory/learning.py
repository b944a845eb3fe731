"""What the memory service calls to learn and forget: background extraction (extraction.py,
supersede.py), recall of extracted lessons and preferences by relevance, per-type expiry and
user erasure (expiry.py). One object, so the service needs a few hook lines only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from proxy.config import MemorySettings
from proxy.memory import expiry
from proxy.memory.extraction import Extractor
from proxy.memory.model import EPISODIC, PROCEDURAL, SEMANTIC, Memory
from proxy.records import Message

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService

log = logging.getLogger("agent_state_proxy.memory")


class Learning:
    def __init__(self, service: MemoryService, *, sweep_interval: float = 60.0) -> None:
        self.service = service
        self.extractor = Extractor(service)
        self.sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.extractor.start()
        if any(s.ttl_days for s in self.service.settings.values()):
            self._sweeper = asyncio.create_task(self._sweep(), name="memory-expiry")

    async def close(self) -> None:
        await self.extractor.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def drain(self) -> None:
        await self.extractor.drain()

    def after_record(self, turn: Any, messages: list[Message]) -> None:
        self.extractor.schedule(turn, messages)

    @staticmethod
    def recall_types(settings: MemorySettings) -> tuple[str, ...]:
        """What a request recalls by relevance: with extraction on, the extracted lessons and
        preferences too (the configured standing ones are in the system prompt already)."""
        return (EPISODIC, SEMANTIC, PROCEDURAL) if settings.extract else (EPISODIC, SEMANTIC)

    def expired(self, tenant: str, memory: Memory) -> bool:
        settings = self.service.settings.get(tenant)
        return settings is not None and expiry.expired(settings, memory)

    async def forget_reverted(self, tenant: str, session: str, seqs: set[int]) -> int:
        return await expiry.forget_reverted(self.service, tenant, session, seqs)

    async def forget_user(self, tenant: str, user: str) -> dict[str, Any]:
        return await expiry.forget_user(self.service, tenant, user)

    async def sweep(self) -> int:
        return sum([await expiry.sweep(self.service, tenant) for tenant in list(self.service.settings)])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("memory: the expiry sweep failed")
