"""Quotas in a fleet: a tenant's daily token quota holds across replicas sharing one PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
import pytest

from proxy.quotas import USAGE_KIND, QuotaSettings, Quotas
from proxy.storage.base import Record, StorageError
from proxy.storage.memory import InMemoryStore
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, keyed_tenant, write_config

KEY = "fleet-quota-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def database(postgres_server) -> str:
    return asyncio.run(postgres_server.new_database())


async def test_concurrent_additions_from_two_replicas_all_count(database: str) -> None:
    from proxy.storage.postgres import PostgresStore

    a = await PostgresStore.open(database, pool_size=4, replicas="many")
    b = await PostgresStore.open(database, pool_size=4, replicas="many")
    try:
        additions = [store.add_to_record("team", USAGE_KIND, "20000", "tokens", 3) for store in (a, b) for _ in range(40)]
        totals = await asyncio.gather(*additions)
        assert sorted(totals) == list(range(3, 3 * 80 + 1, 3))  # each saw its own addition on top of all before it
        assert await b.get_record("team", USAGE_KIND, "20000") == {"tokens": 240}  # the format every store reads
        assert await a.get_record("other", USAGE_KIND, "20000") is None  # per tenant
    finally:
        await a.close()
        await b.close()


async def test_tokens_the_database_could_not_take_are_counted_and_added_later() -> None:
    store, reachable = InMemoryStore(), [False]

    async def counter(tenant: str, kind: str, key: str, field: str, amount: int) -> int:
        if not reachable[0]:
            raise StorageError("storage operation failed: ConnectionRefusedError")
        total = ((await store.get_record(tenant, kind, key)) or {}).get(field, 0) + amount
        await store.put_records(tenant, [Record(kind, key, {field: total})])
        return total

    quotas = Quotas({"team": QuotaSettings(tokens_per_day=100)}, store, clock=lambda: 20000 * 86400 + 5, shared_counter=counter)
    await quotas.add_tokens("team", {"prompt_tokens": 30, "completion_tokens": 10})  # no error: the client has its answer
    await asyncio.sleep(0.1)  # the sender has tried (and failed)
    assert await store.get_record("team", USAGE_KIND, "20000") is None
    assert (await quotas.usage("team"))["current"]["tokens_today"] == 40  # still counted at admission
    reachable[0] = True
    await quotas.add_tokens("team", {"prompt_tokens": 5})
    await quotas.close()  # the app's shutdown: what is unsent is sent (here: once the retry goes through)
    assert await store.get_record("team", USAGE_KIND, "20000") == {"tokens": 45}  # nothing lost
    assert (await quotas.usage("team"))["current"]["tokens_today"] == 45  # and not counted twice


def chat(replica: ProxyProcess, session: str) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "the same question each time"}]}
    return httpx.post(f"{replica.base_url}/chat/completions", json=body, headers=AUTH | {"X-Session-ID": session}, timeout=60)


def test_a_daily_token_quota_holds_across_two_replicas(tmp_path: Path, upstream: FakeUpstream, database: str) -> None:
    limit = 200
    replicas = []
    try:
        for number in range(2):
            directory = tmp_path / f"replica-{number}"
            storage = {"data_dir": str(directory / "data"), "backend": "postgres",
                       "postgres": {"dsn": "${TEST_DATABASE_URL}", "replicas": "many", "pool_size": 4}}
            tenant = keyed_tenant(upstream.base_url, KEY, memory={"enabled": False}, quotas={"tokens_per_day": limit})
            replicas.append(ProxyProcess(write_config(directory, {"team": tenant}, storage=storage),
                                         env={"TEST_DATABASE_URL": database}).start())
        answered, spent = 0, 0
        for number, replica in zip(range(100), itertools.cycle(replicas)):
            response = chat(replica, f"s{number}")
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "quota_exceeded"
                break
            assert response.status_code == 200, response.text
            answered += 1
            spent += response.json()["usage"]["total_tokens"]
        each = spent // answered
        assert each > 0
        # Admitted while the fleet's total was under the limit: the last one may cross it, and one
        # more may be admitted by the other replica while the previous answer's count is on its
        # way to the database (milliseconds, off the request path). Per replica it would be ~2x.
        assert limit <= spent < limit + 2 * each
        assert answered in (-(-limit // each), -(-limit // each) + 1)
        for replica in replicas:  # both refuse now, and both report the one total
            assert chat(replica, "after").status_code == 429
            report = httpx.get(f"{replica.url}/admin/usage", headers=AUTH, timeout=30).json()
            assert report["current"]["tokens_today"] == spent
    finally:
        for replica in replicas:
            replica.stop()
