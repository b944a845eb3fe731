"""Background jobs run once per fleet (proxy/jobs.py): claims in one process, across replicas on
PostgreSQL, and the TTL janitor of two real replicas sharing one database."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.jobs import claims_for
from proxy.records import Session
from proxy.storage.base import Write
from proxy.storage.memory import InMemoryStore
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, open_tenant, write_config


@pytest.fixture
def database(postgres_server) -> str:
    return asyncio.run(postgres_server.new_database())


async def test_a_job_is_granted_to_one_runner_at_a_time_in_one_process() -> None:
    claims = claims_for(InMemoryStore())
    assert not claims.fleet
    async with claims.claim("janitor") as first:
        async with claims.claim("janitor") as second, claims.claim("summaries:t\0s") as other:
            assert (first, second, other) == (True, False, True)
    async with claims.claim("janitor") as again:
        assert again  # let go when the holder's block ended
    assert claims.granted["janitor"] == 2 and claims.refused["janitor"] == 1


async def _fleet_store(dsn: str):
    from proxy.storage.postgres import PostgresStore

    return await PostgresStore.open(dsn, pool_size=2, replicas="many")


async def test_a_job_claimed_by_one_replica_is_refused_to_another_until_let_go(database: str) -> None:
    a, b = await _fleet_store(database), await _fleet_store(database)
    try:
        claims_a, claims_b = claims_for(a), claims_for(b)
        assert claims_a.fleet and claims_b.fleet
        async with claims_a.claim("janitor") as held:
            assert held
            async with claims_b.claim("janitor") as refused, claims_b.claim("summaries:t\0s") as other:
                assert not refused and other
        async with claims_b.claim("janitor") as taken:
            assert taken  # A let it go: B may run it now
    finally:
        await a.close()
        await b.close()


async def test_a_claim_is_freed_when_its_holders_connection_ends(database: str) -> None:
    """A replica that dies mid-job: PostgreSQL ends its connection, and the job is free again."""
    a, b = await _fleet_store(database), await _fleet_store(database)
    admin = await asyncpg.connect(database)
    try:
        claims_a, claims_b = claims_for(a), claims_for(b)
        async with claims_a.claim("janitor") as held:
            assert held
            async with claims_b.claim("janitor") as refused:
                assert not refused
            # What a SIGKILL of replica A amounts to for PostgreSQL: its connections end.
            ended = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                                         "AND granted AND pid <> pg_backend_pid()")
            assert ended == 1
            taken = False
            for _ in range(100):
                async with claims_b.claim("janitor") as taken:
                    if taken:  # while A still believes it holds it: A's job was cut off with its connection
                        async with claims_for(a).claim("janitor") as back:  # asks PostgreSQL, not this process
                            assert not back  # B holds it now; A reconnected to ask (refused, not an error)
                        break
                await asyncio.sleep(0.05)
            assert taken
    finally:
        await admin.close()
        await a.close()
        await b.close()


async def test_a_claim_postgresql_cannot_answer_is_refused_not_raised(database: str) -> None:
    store = await _fleet_store(database)
    claims = claims_for(store)
    await store.close()
    async with claims.claim("janitor") as granted:
        assert not granted  # the job is skipped this time, as if another replica held it
    assert claims.refused["janitor"] == 1


async def test_a_sessions_background_summaries_run_on_one_replica_at_a_time(database: str, tmp_path: Path) -> None:
    """Two replicas' context managers asked to summarize one session: the second skips the pass
    while the first runs it (it would otherwise make the same summarizer calls again)."""
    from proxy.config import load_config
    from proxy.context import manager as context_manager

    tenant = load_config(write_config(tmp_path, {"local": open_tenant("http://h/v1")})).tenants["local"]
    ref = context_manager._Session(tenant, "long-session", 1.0)
    a, b = await _fleet_store(database), await _fleet_store(database)
    ran: list[str] = []
    release = asyncio.Event()
    try:
        managers = {name: context_manager.ContextManager(store, None, claims=claims_for(store)) for name, store in (("a", a), ("b", b))}
        for name, manager in managers.items():
            async def pass_(ref: Any, encoding: str, budget: int, name: str = name) -> None:
                ran.append(name)
                await release.wait()

            manager._summarize_claimed = pass_  # the pass itself: the summarizer calls and their records
        first = asyncio.create_task(managers["a"]._summarize(ref, "o200k_base", 1000))
        while not ran:
            await asyncio.sleep(0.01)
        await managers["b"]._summarize(ref, "o200k_base", 1000)  # returns at once: A is on it
        other = context_manager._Session(tenant, "another-session", 1.0)
        release.set()
        await managers["b"]._summarize(other, "o200k_base", 1000)  # another session's pass is B's to run
        await first
        assert ran == ["a", "b"]
        await managers["b"]._summarize(ref, "o200k_base", 1000)  # A is done: B may run the next pass
        assert ran == ["a", "b", "b"]
    finally:
        release.set()
        await a.close()
        await b.close()


# -- two real replicas ---------------------------------------------------------------------

TTL = 60


def replicas(tmp_path: Path, upstream: FakeUpstream, database: str, count: int = 2) -> list[ProxyProcess]:
    started: list[ProxyProcess] = []
    try:
        for number in range(count):
            directory = tmp_path / f"replica-{number}"
            storage = {"data_dir": str(directory / "data"), "backend": "postgres",
                       "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many", "pool_size": 4}}
            tenant = open_tenant(upstream.base_url, memory={"enabled": False}, session_ttl_seconds=TTL)
            config = write_config(directory, {"local": tenant}, storage=storage, server={"janitor_interval_seconds": 1})
            started.append(ProxyProcess(config, env={"TEST_DATABASE_URL": database}).start())
    except BaseException:
        stop(started)
        raise
    return started


def stop(started: list[ProxyProcess]) -> None:
    for replica in started:
        if replica.process is not None and replica.process.poll() is None:
            replica.stop()


def expire(database: str, count: int) -> None:
    """``count`` sessions idle for longer than the TTL, written straight into the database."""

    async def write() -> None:
        store = await _fleet_store(database)
        try:
            old = time.time() - 10 * TTL
            sessions = [Session(tenant="local", id=f"expired-{n}", created_at=old, last_active=old) for n in range(count)]
            for start in range(0, count, 500):
                await store.apply([Write("local", session) for session in sessions[start:start + 500]])
        finally:
            await store.close()

    asyncio.run(write())


def stored_sessions(database: str) -> int:
    async def count() -> int:
        connection = await asyncpg.connect(database)
        try:
            return await connection.fetchval("SELECT count(*) FROM asp_sessions WHERE tenant = 'local'")
        finally:
            await connection.close()

    return asyncio.run(count())


def deleted_by(replica: ProxyProcess) -> int:
    text = replica.log_path.read_text(errors="replace")
    return sum(int(n) for n in re.findall(r"janitor deleted (\d+) expired sessions", text))


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_replicas_delete_each_expired_session_exactly_once(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    fleet = replicas(tmp_path, upstream, database)
    try:
        # Enough that a sweep outlasts the 1 s interval: both replicas' janitors ask while one works.
        expire(database, 600)
        wait_for(lambda: stored_sessions(database) == 0, 120, "the expired sessions to be deleted")
        wait_for(lambda: sum(deleted_by(r) for r in fleet) >= 600, 30, "the janitors to report")
        time.sleep(2)  # a few more sweeps on each: none may count a session again
        assert sum(deleted_by(r) for r in fleet) == 600  # each deletion done (and reported) once
    finally:
        stop(fleet)


def test_when_the_replica_sweeping_dies_mid_sweep_the_other_finishes_it(tmp_path: Path, upstream: FakeUpstream,
                                                                        database: str) -> None:
    fleet = replicas(tmp_path, upstream, database)
    try:
        expire(database, 1500)
        sweeping: list[ProxyProcess] = []
        wait_for(lambda: sweeping.extend(r for r in fleet if "janitor: deleting" in r.log_path.read_text(errors="replace")) or sweeping,
                 60, "a replica to start sweeping")
        holder = sweeping[0]
        other = next(r for r in fleet if r is not holder)
        wait_for(lambda: stored_sessions(database) < 1500, 60, "the first deletions")
        holder.kill()
        left = stored_sessions(database)
        assert 0 < left < 1500, "the kill was meant to land mid-sweep"
        wait_for(lambda: stored_sessions(database) == 0, 120, "the other replica to finish the sweep")
        wait_for(lambda: deleted_by(other) > 0, 30, "the other replica to report its sweep")
        assert deleted_by(other) <= left + 1  # what the dead one had left (its last delete may have been in flight)
    finally:
        stop(fleet)
