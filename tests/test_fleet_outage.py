"""PostgreSQL goes away under a running fleet: replicas leave rotation (/ready 503), requests get
a 503 in their protocol's shape (never a 500 or a hang), nothing acknowledged is lost, and the
replicas reconnect by themselves when PostgreSQL is back."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, open_tenant, write_config
from tests.postgres_server import PostgresServer, serving


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A cluster of this test's own: stopping it must not disturb the other tests' server."""
    yield from serving()


async def test_a_replica_is_not_ready_when_the_schema_is_not_the_one_it_runs(postgres_server) -> None:
    from proxy.storage.postgres import MIGRATIONS, PostgresStore

    dsn = await postgres_server.new_database()
    store = await PostgresStore.open(dsn, pool_size=2, replicas="many")
    admin = await asyncpg.connect(dsn)
    try:
        assert await store.readiness() is None
        await admin.execute("INSERT INTO asp_schema (version) VALUES ($1)", len(MIGRATIONS) + 1)  # a newer proxy migrated
        problem = await store.readiness()
        assert problem is not None and "agent-state-proxy migrate" in problem and dsn not in problem
        await admin.execute("DELETE FROM asp_schema WHERE version = $1", len(MIGRATIONS) + 1)
        assert await store.readiness() is None
    finally:
        await admin.close()
        await store.close()


def ready(replica: ProxyProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{replica.url}/ready", timeout=10)
    return response.status_code, response.json()


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_postgresql_stopped_and_started_under_load(tmp_path: Path, upstream: FakeUpstream, own_server: PostgresServer) -> None:
    dsn = asyncio.run(own_server.new_database())
    replicas: list[ProxyProcess] = []
    sessions = [f"outage-{n}" for n in range(3)]
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    acknowledged: dict[str, list[str]] = {s: [] for s in sessions}
    answers: list[tuple[float, int, float, Any]] = []  # (when, status, seconds, body)
    stopping = threading.Event()
    threads: list[threading.Thread] = []

    def conversation(session: str) -> None:
        with httpx.Client(timeout=60) as client:
            for number in itertools.count():
                if stopping.is_set():
                    return
                text = f"{session} turn {number}"
                sent[session].append(text)
                began = time.monotonic()
                response = client.post(f"{replicas[number % 2].base_url}/chat/completions", headers={"X-Session-ID": session},
                                       json={"model": "fake-model", "messages": [{"role": "user", "content": text}]})
                answers.append((began, response.status_code, time.monotonic() - began, response.json()))
                if response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == f"echo: {text}":
                    acknowledged[session].append(text)
                else:
                    time.sleep(0.05)

    try:
        for number in range(2):
            directory = tmp_path / f"replica-{number}"
            storage = {"data_dir": str(directory / "data"), "backend": "postgres",
                       "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many", "pool_size": 4, "statement_timeout_ms": 5000}}
            config = write_config(directory, {"local": open_tenant(upstream.base_url, memory={"enabled": False})}, storage=storage)
            replicas.append(ProxyProcess(config, env={"TEST_DATABASE_URL": dsn}).start())
        threads += [threading.Thread(target=conversation, args=(s,), daemon=True) for s in sessions]
        for thread in threads:
            thread.start()
        wait_until(lambda: all(len(acknowledged[s]) >= 3 for s in sessions), 60, "turns before the outage")

        own_server.pause()  # pg_ctl stop -m fast: every connection ends at once
        stopped = time.monotonic()
        for replica in replicas:
            wait_until(lambda: ready(replica)[0] == 503, 10, "/ready to report PostgreSQL gone")
            status, body = ready(replica)
            assert body["status"] == "unavailable" and "PostgreSQL is unreachable" in body["reason"]
            assert dsn not in body["reason"]
        during = {s: len(acknowledged[s]) for s in sessions}
        time.sleep(1.5)
        assert {s: len(acknowledged[s]) for s in sessions} == during  # nothing acknowledged without the database
        chat = httpx.post(f"{replicas[0].base_url}/chat/completions", headers={"X-Session-ID": "probe"}, timeout=30,
                          json={"model": "fake-model", "messages": [{"role": "user", "content": "hello?"}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "storage_error"
        messages = httpx.post(f"{replicas[1].base_url}/messages", headers={"X-Session-ID": "probe"}, timeout=30,
                              json={"model": "fake-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello?"}]})
        assert messages.status_code == 503
        assert messages.json()["type"] == "error" and messages.json()["error"]["message"]  # Anthropic's shape
        responses = httpx.post(f"{replicas[0].base_url}/responses", headers={"X-Session-ID": "probe"}, timeout=30,
                               json={"model": "fake-model", "input": "hello?"})
        assert responses.status_code == 503 and responses.json()["error"]["code"] == "storage_error"

        own_server.resume()
        resumed = time.monotonic()
        for replica in replicas:  # back by themselves: no restart, no operator
            wait_until(lambda: ready(replica)[0] == 200, 30, "/ready after PostgreSQL came back")
        after = {s: len(acknowledged[s]) for s in sessions}
        wait_until(lambda: all(len(acknowledged[s]) >= after[s] + 3 for s in sessions), 60, "turns after the outage")
    finally:
        stopping.set()
        for thread in threads:
            thread.join(60)
    try:
        outage = [a for a in answers if stopped <= a[0] < resumed]
        assert outage and all(status in (200, 503) for _, status, _, _ in answers), {a[1] for a in answers}
        assert any(status == 503 for _, status, _, _ in outage)
        assert all(body["error"]["code"] == "storage_error" for _, status, _, body in answers if status == 503)
        assert max(seconds for _, _, seconds, _ in outage) < 10  # refused, not left hanging
        for session in sessions:
            view = httpx.get(f"{replicas[0].url}/admin/sessions/{session}", timeout=30).json()
            stored = [m["body"]["content"] for m in view["messages"] if m["role"] == "user"]
            assert [t for t in acknowledged[session] if t not in stored] == []  # none lost
            assert sorted({t for t in stored if stored.count(t) > 1}) == []  # none twice
            assert set(stored) <= set(sent[session])
    finally:
        for replica in replicas:
            replica.stop()


async def test_a_write_after_the_session_lock_was_lost_is_refused(postgres_server) -> None:
    """PostgreSQL dropped the lock's connection mid-request (a restart): another replica may hold
    the session now, so this request's writes must not land (503, not acknowledged)."""
    from proxy.records import Session
    from proxy.storage.base import StorageError
    from proxy.storage.postgres import PostgresStore

    dsn = await postgres_server.new_database()
    store = await PostgresStore.open(dsn, pool_size=2, replicas="many")
    admin = await asyncpg.connect(dsn)
    session = Session(tenant="t", id="s", created_at=1.0, last_active=1.0)
    try:
        async with store.session_lock("t", "s", refuse=False):
            await store.commit(session, [])  # while held: written
            ended = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                                         "AND granted AND pid <> pg_backend_pid()")
            assert ended == 1
            for _ in range(100):  # until asyncpg has read the server's goodbye
                await asyncio.sleep(0.02)
                try:
                    await store.commit(session, [])
                except StorageError as exc:
                    assert "session lock was lost" in str(exc)
                    break
            else:
                pytest.fail("a write went on after its session lock was lost")
        await store.commit(session, [])  # a later request, with a lock of its own, writes again
        async with store.session_lock("t", "s", refuse=True):
            await store.commit(session, [])
    finally:
        await admin.close()
        await store.close()
