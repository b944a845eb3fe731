"""``replicas: one`` keeps its promise across a lost connection: the replica lock is a PostgreSQL
advisory lock, which goes with its connection (a database restart, a network cut). While it is
gone nothing is written; it is taken again when PostgreSQL answers; and a replica whose database
another replica used meanwhile stops serving instead of writing over it with stale caches."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.records import Session
from proxy.storage import pg_replica
from proxy.storage.base import StorageError
from proxy.storage.postgres import PostgresStore

SESSION = Session(tenant="t", id="s", created_at=1.0, last_active=1.0)


async def _cut_replica_lock(dsn: str) -> None:
    """End the connection that holds the replica lock, as a restart or a network cut would."""
    admin = await asyncpg.connect(dsn)
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objid = $1 AND pid <> pg_backend_pid()", pg_replica.KEY & 0xFFFF_FFFF)
        assert ended == 1
    finally:
        await admin.close()


async def _until(check, what: str, seconds: float = 10.0):
    for _ in range(int(seconds / 0.05)):
        if (found := await check()) is not None:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {seconds:g} s: {what}")


async def _refused(store: PostgresStore) -> str | None:
    try:
        await store.commit(SESSION, [])
    except StorageError as exc:
        return str(exc)
    return None


async def test_a_lost_replica_lock_stops_writes_until_it_is_taken_again(postgres_server, monkeypatch) -> None:
    monkeypatch.setattr(pg_replica, "WATCH_SECONDS", 0.1)
    dsn = await postgres_server.new_database()
    store = await PostgresStore.open(dsn, pool_size=2)
    try:
        await store.commit(SESSION, [])
        await _cut_replica_lock(dsn)
        why = await _until(lambda: _refused(store), "a write refused once the replica lock's connection is gone")
        assert "replica lock" in why and dsn not in why
        # Taken again on a new connection, and writes resume; readiness agrees throughout.
        async def ready_again():
            return True if await store.readiness() is None else None
        await _until(ready_again, "the replica lock taken again")
        await store.commit(SESSION, [])
        async with store.session_lock("t", "s", refuse=False):
            pass
        # It is held again: a second replica is still refused.
        with pytest.raises(StorageError, match="another agent-state-proxy replica is using this database"):
            await PostgresStore.open(dsn, pool_size=2)
        assert store._replica.lost is None
    finally:
        await store.close()


async def test_a_replica_whose_database_another_used_meanwhile_stops_serving(postgres_server, monkeypatch) -> None:
    monkeypatch.setattr(pg_replica, "WATCH_SECONDS", 0.1)
    dsn = await postgres_server.new_database()
    first = await PostgresStore.open(dsn, pool_size=2)
    reconnect = asyncio.Event()
    connect = first._replica._connect

    async def held_back() -> asyncpg.Connection:  # the first replica's way back is slower than the second's start
        await reconnect.wait()
        return await connect()

    first._replica._connect = held_back
    second = None
    try:
        await first.commit(SESSION, [])
        await _cut_replica_lock(dsn)
        await _until(lambda: _refused(first), "the first replica's writes refused")
        second = await PostgresStore.open(dsn, pool_size=2)  # the lock was free: a new replica starts
        await second.commit(SESSION, [])
        reconnect.set()

        async def lost():
            return first._replica.lost
        why = await _until(lost, "the first replica noticing the other")
        assert "another agent-state-proxy replica" in why and "restart this replica" in why
        assert "restart this replica" in (await first.readiness() or "")
        with pytest.raises(StorageError, match="restart this replica"):
            async with first.session_lock("t", "s", refuse=False):
                pass
        # Even once the other replica has gone, its writes may be missing from this one's caches:
        # this one stays out until restarted.
        await second.close()
        second = None
        await asyncio.sleep(0.5)
        assert "restart this replica" in (await _refused(first) or "")
        # A restarted replica (a new store) serves again.
        restarted = await PostgresStore.open(dsn, pool_size=2)
        try:
            await restarted.commit(SESSION, [])
            assert await restarted.readiness() is None
        finally:
            await restarted.close()
    finally:
        if second is not None:
            await second.close()
        await first.close()
