"""A PostgreSQL replica's claims connection: background-job claims and readiness probes.

One small connection of its own, apart from the pools, (re)opened when needed. Job claims are
session-level advisory locks on it: PostgreSQL lets them all go when it ends, so a replica that
dies (even SIGKILL) or loses the server frees every job it held. Readiness is probed on it too,
so a pool busy with requests is never mistaken for a database that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg

from proxy.storage.base import StorageError

log = logging.getLogger("agent_state_proxy.storage")

# What a failed or vanished database raises through asyncpg. InternalClientError: a connection
# the server dropped mid-operation can be left in a state where the next operation raises it.
FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, TimeoutError)
PROBE_SECONDS = 2.0  # a readiness probe PostgreSQL has not answered by then: not ready


class ClaimsConnection:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._connection: asyncpg.Connection | None = None
        self._turn: asyncio.Lock | None = None
        self._closed = False

    @contextlib.asynccontextmanager
    async def claim(self, job: str) -> AsyncIterator[bool]:
        """Try to claim ``job`` for the fleet: True for the block when granted, False when another
        replica holds it or PostgreSQL cannot be asked (the job is then skipped, as it would be by
        a replica that lost the race)."""
        key = job_lock_key(job)
        granted = False
        try:
            granted = bool(await self.fetchval("SELECT pg_try_advisory_lock($1)", key))
        except StorageError as exc:
            log.warning("cannot claim background job %s: %s", job.split(":", 1)[0], exc)
        try:
            yield granted
        finally:
            if granted:
                with contextlib.suppress(StorageError):  # its connection is ended: the claim is gone with it
                    await self.fetchval("SELECT pg_advisory_unlock($1)", key)

    async def readiness(self, schema_version: int) -> str | None:
        """Why this replica must not take traffic now (PostgreSQL unreachable, or its schema not
        ``schema_version``), or None."""
        try:
            version = await asyncio.wait_for(self.fetchval("SELECT max(version) FROM asp_schema"), PROBE_SECONDS)
        except (StorageError, TimeoutError) as exc:
            return f"PostgreSQL is unreachable: {str(exc) or 'no answer within %g s' % PROBE_SECONDS}"
        if version != schema_version:
            return (f"the database schema is at version {version} but this proxy runs version {schema_version}: "
                    "run `agent-state-proxy migrate` with the newest proxy, then upgrade every replica to it")
        return None

    async def fetchval(self, query: str, *args: Any) -> Any:
        """One statement, (re)connecting on demand; one whose outcome is unknown (cut off, failed)
        ends the connection, which lets all its claims go."""
        if self._closed:
            raise StorageError("store is closed")
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            try:
                if self._connection is None or self._connection.is_closed():
                    self._connection = await self._connect()
                return await self._connection.fetchval(query, *args)
            except BaseException as exc:
                self._end()
                if isinstance(exc, FAILURES):
                    raise StorageError(f"PostgreSQL did not answer: {type(exc).__name__}") from exc
                raise

    def close(self) -> None:
        self._closed = True
        self._end()  # lets every claim go

    def _end(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None


def job_lock_key(job: str) -> int:
    """The advisory lock key of a background job (hashed apart from session keys)."""
    digest = hashlib.blake2b(job.encode("utf-8", "surrogatepass"), digest_size=8, person=b"asp-job").digest()
    return int.from_bytes(digest, "big", signed=True)
