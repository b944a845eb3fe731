"""The replica lock of ``replicas: one``: a database-wide advisory lock, held on a connection of
its own for the store's life, so that a second replica refuses to start.

PostgreSQL lets an advisory lock go with its connection: a database restart or a network cut
frees it, and another replica could then start and write while this one goes on with caches that
assume it is alone. So the lock is watched. While its connection is gone, writes are refused
(``problem``); once PostgreSQL answers again the lock is taken on a new connection, and a token
written under the lock tells whether another replica held the database in between. If one did,
or holds it now, this replica stops serving for good (``lost``): only a restart, which reloads
every cache, makes it safe again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Awaitable, Callable

import asyncpg

from proxy.storage.base import StorageError
from proxy.storage.pg_claims import FAILURES

log = logging.getLogger("proxy.storage")

KEY = 0x6173_7002  # the advisory lock: "asp" + 2
MIGRATION = "CREATE TABLE asp_replica (id smallint PRIMARY KEY, token text NOT NULL);"
WATCH_SECONDS = 1.0  # how often the lock's connection is checked, and retaken once lost
PING_SECONDS = 5.0  # a ping unanswered by then: the connection is treated as gone (a silent network cut)
HELD_ELSEWHERE = ("another agent-state-proxy replica is using this database; "
                  "set storage.postgres.replicas: many on every replica to run a fleet (README: Running a fleet)")


class ReplicaLock:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._connection: asyncpg.Connection | None = None
        self._token = uuid.uuid4().hex  # this store's, written under the lock
        self.lost: str | None = None  # why this replica must stop serving until restarted
        self._watch: asyncio.Task[None] | None = None

    async def take(self) -> None:
        """Take the lock (StorageError when another replica holds it); ``stamp`` once migrated."""
        connection = await self._connect()
        try:
            if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", KEY):
                raise StorageError(HELD_ELSEWHERE)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    @property
    def connection(self) -> asyncpg.Connection:
        assert self._connection is not None, "take() first"
        return self._connection

    async def stamp(self) -> None:
        """Write this store's token under the lock, then watch it."""
        await self.connection.execute(
            "INSERT INTO asp_replica (id, token) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET token = EXCLUDED.token",
            self._token)
        self._watch = asyncio.get_running_loop().create_task(self._watching(), name="replica-lock")

    def problem(self) -> str | None:
        """Why nothing may be written now, or None while the lock is held."""
        if self.lost is not None:
            return self.lost
        if self._connection is None or self._connection.is_closed():
            return "the replica lock's connection to PostgreSQL was lost; writes wait until it is taken again"
        return None

    def check(self) -> None:
        if (why := self.problem()) is not None:
            raise StorageError(why)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._connection is not None:
            await self._connection.close()  # lets the lock go

    async def _watching(self) -> None:
        while self.lost is None:
            await asyncio.sleep(WATCH_SECONDS)
            if self._connection is not None and not self._connection.is_closed():
                try:
                    await asyncio.wait_for(self._connection.fetchval("SELECT 1"), PING_SECONDS)
                    continue
                except FAILURES:
                    self._connection.terminate()
            await self._retake()

    async def _retake(self) -> None:
        """The lock again on a new connection, if PostgreSQL answers (else the next tick tries)."""
        self._connection = None
        try:
            connection = await self._connect()
        except FAILURES:
            return
        try:
            granted = await connection.fetchval("SELECT pg_try_advisory_lock($1)", KEY)
            token = await connection.fetchval("SELECT token FROM asp_replica WHERE id = 1") if granted else None
        except FAILURES:
            connection.terminate()
            return
        if granted and token == self._token:
            self._connection = connection
            log.warning("the replica lock was taken again after its connection to PostgreSQL was lost")
            return
        await connection.close()
        self.lost = (HELD_ELSEWHERE if not granted else
                     "another agent-state-proxy replica used this database while this one was disconnected from it")
        self.lost += "; restart this replica"
        log.error("replica lock lost: %s", self.lost)
