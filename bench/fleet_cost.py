"""What fleet mode costs a turn: PostgreSQL with replicas: one vs many (one and two replicas).

In fleet mode (storage.postgres.replicas: many) every write is one committed transaction before
the turn is acknowledged, nothing is cached across requests (each request reads its session and
transcript from PostgreSQL), and a request holds its session's advisory lock on a second
connection. This measures the whole-request latency a client sees, through real ``serve``
processes and a fake upstream that answers at once, on a private PostgreSQL cluster with
``fsync`` on (as in production; the test cluster runs with it off):

- ``one``: replicas: one, the tenant's default (hybrid) persistence: routine turns are queued;
- ``many x1``: replicas: many, one replica;
- ``many x2``: replicas: many, two replicas, the client alternating between them per request.

Each scenario: ``--sessions`` sessions of ``--turns`` turns, the client sending only its new
message (the proxy restores the history), at concurrency 1 (p50/p95 per request) and at
concurrency ``--concurrency`` (one session per client thread: requests/s).

    PYTHONPATH=. python bench/fleet_cost.py [--sessions 8] [--turns 25] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402


async def _fsync_on(server: PostgresServer) -> None:
    import asyncpg

    connection = await asyncpg.connect(server.admin_dsn)
    try:
        await connection.execute("ALTER SYSTEM SET fsync = on")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


def _replicas(directory: Path, upstream: FakeUpstream, dsn: str, mode: str, count: int) -> list[ProxyProcess]:
    started = []
    for number in range(count):
        storage = {"data_dir": str(directory / f"r{number}" / "data"), "backend": "postgres",
                   "postgres": {"dsn": "${BENCH_DATABASE_URL}", "replicas": mode}}
        config = write_config(directory / f"r{number}", {"local": open_tenant(upstream.base_url, memory={"enabled": False})}, storage=storage)
        started.append(ProxyProcess(config, env={"BENCH_DATABASE_URL": dsn}).start(timeout=60))
    return started


def _conversation(replicas: list[ProxyProcess], session: str, turns: int) -> list[float]:
    took = []
    with httpx.Client(timeout=60) as client:
        for turn in range(turns):
            url = replicas[turn % len(replicas)].base_url + "/chat/completions"
            began = time.perf_counter()
            response = client.post(url, headers={"X-Session-ID": session},
                                   json={"model": "fake-model", "messages": [{"role": "user", "content": f"turn {turn} of {session}"}]})
            took.append(time.perf_counter() - began)
            response.raise_for_status()
    return took


def scenario(server: PostgresServer, upstream: FakeUpstream, mode: str, count: int, args: argparse.Namespace) -> dict[str, float]:
    dsn = asyncio.run(server.new_database())
    with tempfile.TemporaryDirectory() as directory:
        replicas = _replicas(Path(directory), upstream, dsn, mode, count)
        try:
            _conversation(replicas, "warm-up", 5)
            serial = [t for s in range(args.sessions) for t in _conversation(replicas, f"c1-{s}", args.turns)]
            began = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda s: _conversation(replicas, f"cN-{s}", args.turns), range(args.concurrency)))
            throughput = args.concurrency * args.turns / (time.perf_counter() - began)
        finally:
            for replica in replicas:
                replica.stop()
    serial.sort()
    return {"p50_ms": 1000 * statistics.median(serial), "p95_ms": 1000 * serial[int(0.95 * len(serial))], "rps": throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        asyncio.run(_fsync_on(server))
        with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key") as upstream:
            print(f"{'scenario':10} {'c=1 p50 ms':>11} {'c=1 p95 ms':>11} {f'c={args.concurrency} req/s':>11}")
            for name, mode, count in (("one", "one", 1), ("many x1", "many", 1), ("many x2", "many", 2)):
                result = scenario(server, upstream, mode, count, args)
                print(f"{name:10} {result['p50_ms']:11.1f} {result['p95_ms']:11.1f} {result['rps']:11.0f}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
