"""Per-tenant quotas and rate limits: requests per minute, concurrent requests, tokens per day,
sessions and memories stored. Over a limit is a 429 with Retry-After; every refusal is counted.

Counts live in this process (a proxy is one process per data directory); the day's tokens are
also written to the store, so a restart does not hand a tenant a fresh daily budget. In a fleet
(PostgreSQL, replicas: many) the day's tokens are one counter in the database, added to
atomically by every replica (just after each answer, off the request path) and read at each
admission; rate and concurrency limits stay per replica (README: Running a fleet).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

from proxy.config.tenant import QuotaSettings
from proxy.errors import ProxyError
from proxy.storage.base import Record, Write

if TYPE_CHECKING:  # annotations only
    from proxy.storage.base import Store

KEYS = tuple(QuotaSettings.model_fields)
USAGE_KIND = "usage"  # tenant-level record per UTC day: {"tokens": n}
_DAY = 86400
_STORED_RETRY_SECONDS = 60  # sessions and memories free up when they expire or are deleted
_RESEND_SECONDS = 1.0  # between tries to add to a shared counter the database did not take
log = logging.getLogger("agent_state_proxy.quotas")

# (tenant, kind, key, field, amount) -> the field's new value, added atomically for the fleet
SharedCounter = Callable[[str, str, str, str, int], Awaitable[int]]


class QuotaExceeded(ProxyError):
    status = 429
    type = "requests"


def _refuse(message: str, code: str, retry_after: float) -> QuotaExceeded:
    return QuotaExceeded(message, code=code, type="requests" if code == "rate_limit_exceeded" else "insufficient_quota",
                         headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class Quotas:
    """The running counts of every tenant, checked before work is done and updated after."""

    def __init__(self, settings: Mapping[str, QuotaSettings], store: Store, clock: Callable[[], float] = time.time,
                 shared_counter: SharedCounter | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self._shared = shared_counter
        # Tokens counted here and not yet added to the shared counter, by (tenant, day): sent by
        # one task off the request path (retried while the database is unreachable), and counted
        # at admission meanwhile.
        self._unsent: collections.Counter[tuple[str, int]] = collections.Counter()
        self._sending: collections.Counter[tuple[str, int]] = collections.Counter()
        self._sender: asyncio.Task[None] | None = None
        self._recent: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._tokens: dict[str, tuple[int, int]] = {}  # tenant -> (day number, tokens that day)
        self.refused: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    # -- requests --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def request(self, tenant: str) -> AsyncIterator[None]:
        """Admit one request (rate, concurrency and the day's tokens) and hold its slot until it ends."""
        limits = self.settings.get(tenant) or QuotaSettings()  # a tenant a reload added meanwhile
        now = self.clock()
        if limits.requests_per_minute is not None:
            recent = self._recent[tenant]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= limits.requests_per_minute:
                self._count(tenant, "requests_per_minute")
                raise _refuse(f"rate limit reached: {limits.requests_per_minute} requests per minute for this tenant",
                              "rate_limit_exceeded", recent[0] + 60 - now)
        if limits.concurrent_requests is not None and self._in_flight[tenant] >= limits.concurrent_requests:
            self._count(tenant, "concurrent_requests")
            raise _refuse(f"rate limit reached: {limits.concurrent_requests} concurrent requests for this tenant",
                          "rate_limit_exceeded", 1)
        if limits.tokens_per_day is not None and await self._tokens_today(tenant) >= limits.tokens_per_day:
            self._count(tenant, "tokens_per_day")
            raise _refuse(f"quota exceeded: {limits.tokens_per_day} tokens per day for this tenant (resets at 00:00 UTC)",
                          "quota_exceeded", _DAY - now % _DAY)
        if limits.requests_per_minute is not None:
            self._recent[tenant].append(now)
        self._in_flight[tenant] += 1
        try:
            yield
        finally:
            self._in_flight[tenant] -= 1

    async def add_tokens(self, tenant: str, usage: Any) -> None:
        """Count the tokens of one answer (the provider's ``usage``); kept in the store per day."""
        if not isinstance(usage, dict):
            return
        tokens = sum(int(v) for v in (usage.get("prompt_tokens"), usage.get("completion_tokens"))
                     if isinstance(v, int) and not isinstance(v, bool) and v > 0)
        if not tokens:
            return
        if self._shared is not None:
            return self._add_shared(tenant, int(self.clock() // _DAY), tokens)
        total = await self._tokens_today(tenant) + tokens
        day = int(self.clock() // _DAY)
        self._tokens[tenant] = (day, total)
        # Batched with the routine writes: a crash loses at most the last flush interval's count.
        await self.store.apply([Write(tenant, records=[Record(USAGE_KIND, str(day), {"tokens": total})])], durable=False)

    def _add_shared(self, tenant: str, day: int, tokens: int) -> None:
        """Count tokens toward the fleet's counter: sent off the request path, by one task."""
        self._unsent[(tenant, day)] += tokens
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send(), name="quota-counter")

    async def _send(self) -> None:
        """Add what this replica counted to the fleet's counters; what the database cannot take
        now is kept and tried again (never an error for an answer the client already has)."""
        while self._unsent:
            key, amount = self._unsent.popitem()
            self._sending[key] += amount  # still counted at admission while on its way
            sent = False
            try:
                await self._shared(key[0], USAGE_KIND, str(key[1]), "tokens", amount)
                sent = True
            except Exception as exc:  # StorageError, or a bug: either way the count is kept
                log.warning("tokens of tenant %s not yet added to the fleet's daily count (%s); kept to add later", key[0], exc)
            finally:
                self._sending[key] -= amount
                if not sent:
                    self._unsent[key] += amount
            if not sent:
                await asyncio.sleep(_RESEND_SECONDS)

    async def close(self) -> None:
        """Send what is still unsent (the app's shutdown, before the store closes); bounded."""
        if self._sender is not None and not self._sender.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), _RESEND_SECONDS * 3)
            except asyncio.TimeoutError:
                log.error("closing with tokens not added to the fleet's daily count: %s", dict(self._unsent))
            self._sender.cancel()

    async def _tokens_today(self, tenant: str) -> int:
        day = int(self.clock() // _DAY)
        if self._shared is not None:  # the fleet's count: other replicas add to it too
            stored = await self.store.get_record(tenant, USAGE_KIND, str(day))
            tokens = stored.get("tokens") if isinstance(stored, dict) else 0
            return (tokens if isinstance(tokens, int) else 0) + self._unsent[(tenant, day)] + self._sending[(tenant, day)]
        known = self._tokens.get(tenant)
        if known is None or known[0] != day:
            stored = await self.store.get_record(tenant, USAGE_KIND, str(day))
            tokens = stored.get("tokens") if isinstance(stored, dict) else 0
            known = self._tokens[tenant] = (day, tokens if isinstance(tokens, int) else 0)
        return known[1]

    # -- what is stored --------------------------------------------------------------------

    async def check_new_session(self, tenant: str, session_id: str) -> None:
        """Before a session is created (a first request, a fork): refuse past ``sessions``."""
        limit = (self.settings.get(tenant) or QuotaSettings()).sessions
        if limit is None or await self.store.get_session(tenant, session_id) is not None:
            return
        if len(await self.store.list_sessions(tenant)) >= limit:
            self._count(tenant, "sessions")
            raise _refuse(f"quota exceeded: this tenant stores at most {limit} sessions; delete some or wait for them to expire",
                          "quota_exceeded", _STORED_RETRY_SECONDS)

    def check_new_memory(self, tenant: str, stored: int) -> None:
        limit = (self.settings.get(tenant) or QuotaSettings()).memories
        if limit is not None and stored >= limit:
            self._count(tenant, "memories")
            raise _refuse(f"quota exceeded: this tenant stores at most {limit} memories; delete some first",
                          "quota_exceeded", _STORED_RETRY_SECONDS)

    # -- reporting -------------------------------------------------------------------------

    def _count(self, tenant: str, limit: str) -> None:
        self.refused[tenant][limit] += 1

    async def usage(self, tenant: str) -> dict[str, Any]:
        """What the tenant uses now against each limit, and how often each refused it."""
        limits = self.settings.get(tenant) or QuotaSettings()  # a tenant a reload added meanwhile
        now = self.clock()
        recent = [t for t in self._recent.get(tenant, ()) if t > now - 60]
        return {
            "tenant": tenant,
            "object": "usage",
            "limits": {key: getattr(limits, key) for key in KEYS},
            "current": {
                "requests_last_minute": len(recent) if limits.requests_per_minute is not None else None,
                "concurrent_requests": self._in_flight[tenant],
                "tokens_today": await self._tokens_today(tenant),
            },
            "refused": {key: self.refused[tenant][key] for key in KEYS},
        }
