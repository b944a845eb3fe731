"""Fleet mode: several proxy processes on one PostgreSQL database (storage.postgres.replicas: many),
one writer per session across them, run the way an operator runs them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, open_tenant, write_config


@pytest.fixture
def database(postgres_server) -> str:
    return asyncio.run(postgres_server.new_database())


def fleet(tmp_path: Path, upstream: FakeUpstream, database: str, count: int = 2, **tenant: Any) -> list[ProxyProcess]:
    """``count`` replicas (separate processes, own data dirs) on one database, started."""
    replicas = []
    try:
        for number in range(count):
            directory = tmp_path / f"replica-{number}"
            storage = {"data_dir": str(directory / "data"), "backend": "postgres",
                       "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many"}}
            config = write_config(directory, {"local": open_tenant(upstream.base_url, memory={"enabled": False}, **tenant)}, storage=storage)
            replicas.append(ProxyProcess(config, env={"TEST_DATABASE_URL": database}).start())
    except BaseException:
        stop(replicas)
        raise
    return replicas


def stop(replicas: list[ProxyProcess]) -> None:
    for replica in replicas:
        if replica.process is not None:
            replica.stop()


def transcript(replica: ProxyProcess, session: str) -> dict[str, Any]:
    response = httpx.get(f"{replica.url}/admin/sessions/{session}", timeout=30)
    response.raise_for_status()
    return response.json()


def active_contents(view: dict[str, Any]) -> list[str]:
    return [m["body"]["content"] for m in view["messages"] if m["active"]]


def test_a_client_alternating_replicas_keeps_one_conversation(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    replicas = fleet(tmp_path, upstream, database)
    try:
        clients = [openai.OpenAI(base_url=r.base_url, api_key="x", max_retries=0) for r in replicas]
        said = []
        for turn, client in zip(range(6), itertools.cycle(clients)):
            text = f"turn {turn}"
            # The agent sends only its new message: the history comes from the state both share.
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}],
                                           extra_headers={"X-Session-ID": "alternating"})
            said += [text, f"echo: {text}"]
            assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == said[:-1]
        for replica in replicas:  # each replica shows the one transcript: one path, no branch
            view = transcript(replica, "alternating")
            assert view["session"]["branches"] == 0  # never branched
            assert [m["body"]["content"] for m in view["messages"]] == said
            assert all(m["active"] for m in view["messages"])
    finally:
        stop(replicas)


def test_concurrent_requests_of_one_session_through_two_replicas_never_fork(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    upstream.latency = 0.2  # every request overlaps the others: without one writer, two would share a head
    replicas = fleet(tmp_path, upstream, database)
    try:
        clients = [openai.OpenAI(base_url=r.base_url, api_key="x", max_retries=0, timeout=120) for r in replicas]
        texts = [f"message {i}" for i in range(10)]

        def send(index: int) -> None:
            clients[index % 2].chat.completions.create(model="fake-model", messages=[{"role": "user", "content": texts[index]}],
                                                       extra_headers={"X-Session-ID": "contended"})

        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            list(pool.map(send, range(len(texts))))  # each one acknowledged (raises otherwise)
        view = transcript(replicas[0], "contended")
        assert view["session"]["branches"] == 0  # never branched
        contents = active_contents(view)
        assert len(contents) == len(view["messages"]) == 2 * len(texts)  # none reverted, none lost
        assert sorted(contents[0::2]) == sorted(texts)
        assert contents[1::2] == [f"echo: {text}" for text in contents[0::2]]
        # Serialised: each request saw every turn acknowledged before it, whichever replica ran it.
        assert sorted(len(r["messages"]) for r in upstream.chat_requests) == list(range(1, 2 * len(texts), 2))
    finally:
        stop(replicas)


def test_a_retry_with_the_same_idempotency_key_on_the_other_replica_is_the_same_turn(tmp_path: Path, upstream: FakeUpstream,
                                                                                      database: str) -> None:
    replicas = fleet(tmp_path, upstream, database)
    try:
        headers = {"X-Session-ID": "paid", "Idempotency-Key": "order-7"}
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "charge it"}]}
        first = httpx.post(f"{replicas[0].base_url}/chat/completions", json=body, headers=headers, timeout=30)
        retried = httpx.post(f"{replicas[1].base_url}/chat/completions", json=body, headers=headers, timeout=30)
        assert first.status_code == retried.status_code == 200
        assert retried.json()["id"] == first.json()["id"]  # the recorded answer, not a second call
        assert len(upstream.chat_requests) == 1
        assert active_contents(transcript(replicas[1], "paid")) == ["charge it", "echo: charge it"]
    finally:
        stop(replicas)


def test_a_delete_on_one_replica_is_seen_by_the_other_at_once(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    replicas = fleet(tmp_path, upstream, database)
    try:
        a, b = (openai.OpenAI(base_url=r.base_url, api_key="x", max_retries=0) for r in replicas)
        headers = {"X-Session-ID": "erased"}
        for text in ("my card ends 4242", "remember it"):
            b.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}], extra_headers=headers)
        assert httpx.delete(f"{replicas[0].url}/admin/sessions/erased", timeout=30).status_code == 200
        assert httpx.get(f"{replicas[1].url}/admin/sessions/erased", timeout=30).status_code == 404
        b.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "what is my card?"}], extra_headers=headers)
        assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == ["what is my card?"]  # nothing came back
    finally:
        stop(replicas)


def test_concurrency_reject_refuses_across_replicas(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    upstream.latency = 3.0
    replicas = fleet(tmp_path, upstream, database, concurrency="reject")
    try:
        first, second = (openai.OpenAI(base_url=r.base_url, api_key="x", max_retries=0, timeout=60) for r in replicas)
        headers = {"X-Session-ID": "busy"}
        slow = threading.Thread(target=lambda: first.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "slow"}], extra_headers=headers))
        slow.start()
        deadline = time.monotonic() + 30
        while not upstream.chat_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.chat_requests, "the first request never reached the upstream"
        with pytest.raises(openai.ConflictError) as refused:
            second.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "meanwhile"}], extra_headers=headers)
        assert refused.value.body["code"] == "session_busy"
        slow.join(60)
        upstream.latency = 0.0
        second.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "after"}], extra_headers=headers)
        assert active_contents(transcript(replicas[1], "busy")) == ["slow", "echo: slow", "after", "echo: after"]
    finally:
        stop(replicas)


def test_sigkill_of_replicas_under_load_loses_or_duplicates_no_acknowledged_turn(tmp_path: Path, upstream: FakeUpstream,
                                                                                    database: str) -> None:
    """A few rounds of bench/fleet_crash.py (its documented run has 100 kills)."""
    from bench.fleet_crash import run

    upstream.latency = 0.02  # requests are in flight when a kill lands
    report = run(database, upstream, tmp_path, kills=3, clients=4)
    assert report.kills == 3 and report.acknowledged >= 20, report
    assert report.lost == [] and report.duplicated == [] and report.unknown == [], report
    assert report.branched == [] and report.out_of_order == [], report


# -- the store's session lock, between two stores as two replicas hold them ------------------

async def two_stores(database: str) -> tuple[Any, Any]:
    from proxy.storage.postgres import PostgresStore

    first = await PostgresStore.open(database, pool_size=3, replicas="many")
    try:
        second = await PostgresStore.open(database, pool_size=3, replicas="many")  # no replica lock refuses it
    except BaseException:
        await first.close()
        raise
    return first, second


async def test_a_session_lock_excludes_the_other_replica_until_released(database: str) -> None:
    from proxy.storage.base import SessionBusy

    first, second = await two_stores(database)
    try:
        order: list[str] = []
        async with first.session_lock("t", "s", refuse=False):
            with pytest.raises(SessionBusy):
                async with second.session_lock("t", "s", refuse=True):
                    pass
            async with second.session_lock("t", "other", refuse=True), second.session_lock("other-tenant", "s", refuse=True):
                pass  # other sessions, and the same id of another tenant, are not held

            async def wait_then_enter() -> None:
                async with second.session_lock("t", "s", refuse=False):
                    order.append("second")

            waiter = asyncio.create_task(wait_then_enter())
            await asyncio.sleep(0.3)
            assert not waiter.done()  # waiting on the first replica's lock
            order.append("first")
        await asyncio.wait_for(waiter, 30)
        assert order == ["first", "second"]
        async with first.session_lock("t", "s", refuse=True):  # released by both
            pass
    finally:
        await first.close()
        await second.close()


async def test_a_cancelled_wait_leaves_no_lock_behind(database: str) -> None:
    """A client that disconnects while its request waits for the session must not leave the lock
    granted to a connection nobody uses (the session would be busy for ever)."""
    first, second = await two_stores(database)
    try:
        async with first.session_lock("t", "s", refuse=False):
            async def wait() -> None:
                async with second.session_lock("t", "s", refuse=False):
                    pass

            waiter = asyncio.create_task(wait())
            await asyncio.sleep(0.3)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        deadline = time.monotonic() + 30
        while True:  # the ended connection's backend goes away by itself, soon
            try:
                async with second.session_lock("t", "s", refuse=True), first.session_lock("t", "s2", refuse=True):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await first.close()
        await second.close()


async def test_one_replica_mode_still_refuses_a_second_replica(database: str) -> None:
    from proxy.storage.base import StorageError
    from proxy.storage.postgres import PostgresStore

    first = await PostgresStore.open(database)
    try:
        with pytest.raises(StorageError, match="replicas: many"):
            await PostgresStore.open(database)
    finally:
        await first.close()


def test_the_fleet_example_is_a_valid_fleet_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/fleet cannot run here (no Docker): its proxy config loads as fleet mode, and the
    compose file runs two replicas of that config on one database behind the round-robin."""
    import yaml

    from proxy.config import load_config
    from tests.harness import REPO

    monkeypatch.setenv("DATABASE_URL", "postgresql://asp:secret@postgres:5432/asp")
    config = load_config(REPO / "examples" / "fleet" / "proxy.yaml")
    assert (config.storage_backend, config.postgres.replicas) == ("postgres", "many")
    compose = yaml.safe_load((REPO / "examples" / "fleet" / "docker-compose.yml").read_text())
    replicas = [compose["services"][name] for name in ("proxy-a", "proxy-b")]
    assert all("./proxy.yaml:/app/fleet/proxy.yaml:ro" in r["volumes"] and r["environment"]["ASP_CONFIG"] == "/app/fleet/proxy.yaml"
               for r in replicas)
    assert len({r["environment"]["DATABASE_URL"] for r in replicas}) == 1
    nginx = (REPO / "examples" / "fleet" / "nginx.conf").read_text()
    assert "server proxy-a:8765;" in nginx and "server proxy-b:8765;" in nginx


async def test_when_every_lock_connection_is_held_a_request_gets_a_storage_error_not_a_hang(database: str) -> None:
    from proxy.storage.base import StorageError
    from proxy.storage.postgres import PostgresStore

    store = await PostgresStore.open(database, pool_size=1, statement_timeout_ms=500, replicas="many")
    other = await PostgresStore.open(database, pool_size=1, statement_timeout_ms=500, replicas="many")
    try:
        async with store.session_lock("t", "held", refuse=False):
            with pytest.raises(StorageError, match="cannot take the session lock"):
                async with store.session_lock("t", "another", refuse=False):
                    pass  # no connection free on this replica
            with pytest.raises(StorageError, match="cannot take the session lock"):
                async with other.session_lock("t", "held", refuse=False):
                    pass  # the other replica waits at most the statement timeout
        async with store.session_lock("t", "another", refuse=True), other.session_lock("t", "held", refuse=True):
            pass  # both free again once released
    finally:
        await store.close()
        await other.close()
