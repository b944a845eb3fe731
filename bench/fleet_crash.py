"""SIGKILL replicas of a fleet under load; audit that no acknowledged turn is lost or duplicated.

Two ``serve`` processes share one PostgreSQL database (storage.postgres.replicas: many). Client
threads, one conversation each, send only their new message, alternating replicas turn by turn,
without retries (a failed request is simply not acknowledged). Every 0.2-1.0 s one replica, chosen
at random, is killed with SIGKILL while requests are in flight on it and locks are held by it,
then restarted. At the end every session's transcript is read back and audited: each
acknowledged turn stored exactly once, every stored turn one that was sent, all on one path
(no branch), in the order each client sent them.

    PYTHONPATH=. python bench/fleet_crash.py --kills 100 [--clients 4]

CI runs 3 kills (tests/test_fleet.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402


@dataclass
class Report:
    kills: int = 0
    sent: int = 0
    acknowledged: int = 0
    stored: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, not stored
    duplicated: list[str] = field(default_factory=list)  # stored more than once
    unknown: list[str] = field(default_factory=list)  # stored, never sent
    branched: list[str] = field(default_factory=list)  # sessions with a branch or a reverted message
    out_of_order: list[str] = field(default_factory=list)  # sessions whose turns are not in sending order
    restart_seconds: list[float] = field(default_factory=list)


def start_fleet(directory: Path, upstream: FakeUpstream, dsn: str, count: int = 2) -> list[ProxyProcess]:
    replicas: list[ProxyProcess] = []
    try:
        for number in range(count):
            where = directory / f"replica-{number}"
            storage = {"data_dir": str(where / "data"), "backend": "postgres",
                       "postgres": {"dsn": "${FLEET_DATABASE_URL}", "replicas": "many"}}
            config = write_config(where, {"local": open_tenant(upstream.base_url, memory={"enabled": False})}, storage=storage)
            replicas.append(ProxyProcess(config, env={"FLEET_DATABASE_URL": dsn}).start(timeout=60))
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def run(dsn: str, upstream: FakeUpstream, directory: Path, kills: int, clients: int = 4, seed: int = 1) -> Report:
    """Run the load and the kills, then audit; the replicas are stopped before it returns."""
    chance = random.Random(seed)
    replicas = start_fleet(directory, upstream, dsn)
    sessions = [f"fleet-{n}" for n in range(clients)]
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    acknowledged: dict[str, list[str]] = {s: [] for s in sessions}
    stopping = threading.Event()

    def conversation(session: str) -> None:
        with httpx.Client(timeout=60) as client:
            for number in itertools.count():
                if stopping.is_set():
                    return
                text = f"{session} turn {number}"
                sent[session].append(text)
                try:
                    response = client.post(f"{replicas[number % len(replicas)].base_url}/chat/completions",
                                           headers={"X-Session-ID": session},
                                           json={"model": "fake-model", "messages": [{"role": "user", "content": text}]})
                    answered = response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == f"echo: {text}"
                except (httpx.HTTPError, ValueError):
                    answered = False
                if answered:
                    acknowledged[session].append(text)
                else:
                    time.sleep(0.05)  # its replica is down or restarting

    report = Report()
    threads = [threading.Thread(target=conversation, args=(s,), daemon=True) for s in sessions]
    for thread in threads:
        thread.start()
    try:
        for _ in range(kills):
            time.sleep(chance.uniform(0.2, 1.0))
            victim = chance.choice(replicas)
            victim.kill()
            report.kills += 1
            began = time.monotonic()
            victim.start(timeout=60)
            report.restart_seconds.append(time.monotonic() - began)
        time.sleep(1.0)  # some turns after the last restart
    finally:
        stopping.set()
        for thread in threads:
            thread.join(120)
    try:
        for session in sessions:
            response = httpx.get(f"{replicas[0].url}/admin/sessions/{session}", timeout=60)
            if response.status_code == 404:
                view = {"session": {"branches": 0}, "messages": []}
            else:
                response.raise_for_status()
                view = response.json()
            stored = [m["body"]["content"] for m in view["messages"] if m["role"] == "user"]
            report.sent += len(sent[session])
            report.acknowledged += len(acknowledged[session])
            report.stored += len(stored)
            report.lost += [t for t in acknowledged[session] if t not in stored]
            report.duplicated += sorted({t for t in stored if stored.count(t) > 1})
            report.unknown += [t for t in stored if t not in sent[session]]
            if view["session"]["branches"] or not all(m["active"] for m in view["messages"]):
                report.branched.append(session)
            if stored != [t for t in sent[session] if t in stored]:
                report.out_of_order.append(session)
    finally:
        for replica in replicas:
            replica.stop()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from tests.postgres_server import PostgresServer

    server = PostgresServer().start()
    try:
        dsn = asyncio.run(server.new_database())
        with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key") as upstream, tempfile.TemporaryDirectory() as directory:
            upstream.latency = 0.02  # requests are in flight when a kill lands
            report = run(dsn, upstream, Path(directory), args.kills, args.clients, args.seed)
    finally:
        server.stop()
    restarts = sorted(report.restart_seconds)
    print(f"kills {report.kills}, turns sent {report.sent}, acknowledged {report.acknowledged}, stored {report.stored}")
    print(f"lost {len(report.lost)}, duplicated {len(report.duplicated)}, never sent {len(report.unknown)}, "
          f"branched sessions {len(report.branched)}, out of order {len(report.out_of_order)}")
    if restarts:
        print(f"restart -> ready p50 {restarts[len(restarts) // 2]:.2f} s, max {restarts[-1]:.2f} s")
    failed = report.lost or report.duplicated or report.unknown or report.branched or report.out_of_order
    if failed:
        print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
