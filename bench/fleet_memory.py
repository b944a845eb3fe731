"""Long-term memory in fleet mode: how soon a replica sees another's memories, and what a
replica's start-up costs on a large database.

``delay``: two ``serve`` replicas on one private PostgreSQL (``fsync`` on). Per sample:
* add: ``POST /v1/memories`` on A, then B polled (``GET /v1/memories/{id}``, answered from B's
  index, every ``--poll-ms``) until it has it; the delay counts from A's answer;
* delete: ``DELETE`` on A, then B polled until it answers 404;
* episodic: a chat turn on A, then B's memory count polled until both recorded messages are in
  it; this delay counts from A's answer and includes A embedding and storing them.

``startup``: a database seeded directly (COPY of the proxy's own records: ``--sessions``
sessions of ``--messages`` messages each, ``--memories`` episodic memories with vectors and each
session's mark, so nothing is re-indexed), then one replica started: seconds to ``/ready``, to
memory ready (searchable: lexical and exact vector search), to the HNSW index built, and the
process's RssAnon then.

    PYTHONPATH=. python bench/fleet_memory.py delay [--samples 50] [--poll-ms 5]
    PYTHONPATH=. python bench/fleet_memory.py startup [--sessions 10000] [--messages 100] [--memories 100000]
    PYTHONPATH=. python bench/fleet_memory.py restart [--memories 20000] [--rounds 3] [--changed 500]

``restart``: the same seeding, then one replica restarted ``--rounds`` times with its saved
index and as many times without it (its files removed: a full rebuild), alternately. Before
each start ``--changed`` memories are rewritten through a fleet connection (logged changes:
re-keyed and re-added from the change log). Per start: seconds until the HNSW index is ready,
and the process's CPU seconds (user + system) by then.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_cost import _fsync_on  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402

TENANT = "local"


def _replica(directory: Path, upstream: FakeUpstream, dsn: str, name: str) -> ProxyProcess:
    storage = {"data_dir": str(directory / name / "data"), "backend": "postgres",
               "postgres": {"dsn": "${BENCH_DATABASE_URL}", "replicas": "many"}}
    config = write_config(directory / name, {TENANT: open_tenant(upstream.base_url)}, storage=storage)
    return ProxyProcess(config, env={"BENCH_DATABASE_URL": dsn}).start(timeout=120)


def _stats(client: httpx.Client, replica: ProxyProcess) -> dict[str, Any]:
    return client.get(f"{replica.url}/admin/memory").json()


def _until(check: Callable[[], bool], poll: float, timeout: float = 60.0) -> float:
    """Seconds until ``check`` holds (polled every ``poll``)."""
    began = time.perf_counter()
    while not check():
        if time.perf_counter() - began > timeout:
            raise TimeoutError("not within %.0f s" % timeout)
        time.sleep(poll)
    return time.perf_counter() - began


def _summary(values: list[float]) -> str:
    ordered = sorted(v * 1000 for v in values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"n={len(ordered)} p50={statistics.median(ordered):.1f} ms p95={p95:.1f} ms max={ordered[-1]:.1f} ms"


def delay(args: argparse.Namespace) -> None:
    server = PostgresServer().start()
    try:
        asyncio.run(_fsync_on(server))
        with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key") as upstream:
            _delay(server, upstream, args)
    finally:
        server.stop()


def _delay(server: PostgresServer, upstream: FakeUpstream, args: argparse.Namespace) -> None:
    dsn = asyncio.run(server.new_database())
    with tempfile.TemporaryDirectory() as directory, httpx.Client(timeout=60) as client:
        a, b = (_replica(Path(directory), upstream, dsn, name) for name in ("a", "b"))
        try:
            poll = args.poll_ms / 1000
            _until(lambda: all(_stats(client, r)["ready"] and _stats(client, r)["embedder"]["ready"] for r in (a, b)), 0.2)
            added, deleted, episodic = [], [], []
            for sample in range(args.samples):
                response = client.post(f"{a.url}/v1/memories", json={"content": f"fact {sample}: the {uuid.uuid4().hex[:8]} project ships in spring"})
                response.raise_for_status()
                memory_id = response.json()["id"]
                added.append(_until(lambda: client.get(f"{b.url}/v1/memories/{memory_id}").status_code == 200, poll))
                client.delete(f"{a.url}/v1/memories/{memory_id}").raise_for_status()
                deleted.append(_until(lambda: client.get(f"{b.url}/v1/memories/{memory_id}").status_code == 404, poll))
                before = _stats(client, b)["index"]["episodic"]
                client.post(f"{a.base_url}/chat/completions", headers={"X-Session-ID": f"s{sample}", "X-User-ID": "u"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": f"note {sample}: call the plumber on Tuesday"}]}
                            ).raise_for_status()
                episodic.append(_until(lambda: _stats(client, b)["index"]["episodic"] >= before + 2, poll))
                time.sleep(0.05)
            print(f"A->B add (API):        {_summary(added)}")
            print(f"A->B delete (API):     {_summary(deleted)}")
            print(f"A->B episodic (turn):  {_summary(episodic)}  (includes A embedding the turn)")
            print("B counters:", {k: v for k, v in _stats(client, b)["counters"].items() if k.startswith("fleet")})
        finally:
            for replica in (a, b):
                replica.stop()


async def _seed(dsn: str, sessions: int, messages: int, memories: int, model: str, dim: int = 384) -> None:
    """Write the proxy's own records with COPY (no triggers fire: this connection is no fleet's)."""
    import asyncpg

    from proxy import codec
    from proxy.memory.model import EPISODIC, Memory, episodic_id
    from proxy.records import Message, Session
    from proxy.storage.kv import session_digest
    from proxy.storage.postgres import PostgresStore

    store = await PostgresStore.open(dsn, replicas="many")  # creates the schema
    await store.close()
    connection = await asyncpg.connect(dsn)
    rng = np.random.default_rng(7)
    per_session = max(1, memories // sessions)
    key = 0
    try:
        now = time.time() - 86_400
        for start in range(0, sessions, 500):
            session_rows, message_rows, record_rows = [], [], []
            for number in range(start, min(sessions, start + 500)):
                sid = f"seeded-{number}"
                digest = session_digest(sid)
                created = now + number
                session = Session(TENANT, sid, created, created, user_id=f"user-{number % 100}", head=messages - 1, next_seq=messages,
                                  turns=messages // 2)
                session_rows.append((TENANT, digest, codec.encode(session)))
                for seq in range(messages):
                    role = "user" if seq % 2 == 0 else "assistant"
                    body = {"role": role, "content": f"message {seq} of session {number}: we talked about topic {rng.integers(1000)}"}
                    message_rows.append((TENANT, digest, seq, codec.encode(Message(seq, seq - 1 if seq else None, f"{seq:x}", role, body, created + seq))))
                vectors = rng.standard_normal((per_session, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                for seq, vector in zip(range(per_session), vectors):
                    memory = Memory(id=episodic_id(TENANT, sid, created, seq), type=EPISODIC, text=f"message {seq} of session {number}",
                                    ts=created + seq, key=key, user=session.user_id, session=sid, session_created=created, seq=seq,
                                    role="user" if seq % 2 == 0 else "assistant", model=model, vector=vector)
                    key += 1
                    record_rows += [(TENANT, digest, r.kind, r.key.encode(), codec.encode(r.value)) for r in memory.records()]
                record_rows.append((TENANT, digest, "memory_mark", b"next", codec.encode({"next": messages, "created": created})))
            await connection.copy_records_to_table("asp_sessions", records=session_rows, columns=["tenant", "sid", "record"])
            await connection.copy_records_to_table("asp_messages", records=message_rows, columns=["tenant", "sid", "seq", "record"])
            await connection.copy_records_to_table("asp_records", records=record_rows, columns=["tenant", "sid", "kind", "key", "record"])
        await connection.execute("ANALYZE")
        size = await connection.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
        print(f"seeded {sessions} sessions, {sessions * messages} messages, {min(memories, sessions * per_session)} memories ({size})", flush=True)
    finally:
        await connection.close()


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _on_a_seeded_database(args: argparse.Namespace, run: Callable[[str, FakeUpstream, argparse.Namespace], None]) -> None:
    """A private PostgreSQL server seeded as ``args`` say, and a fake upstream, for ``run``."""
    from proxy.memory.remote import LOCAL_ENGINES

    server = PostgresServer().start()
    try:
        with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key") as upstream:
            dsn = asyncio.run(server.new_database())
            began = time.perf_counter()
            asyncio.run(_seed(dsn, args.sessions, args.messages, args.memories, f"local/{LOCAL_ENGINES['local'].name}"))
            print(f"seeding took {time.perf_counter() - began:.0f} s", flush=True)
            run(dsn, upstream, args)
    finally:
        server.stop()


def startup(args: argparse.Namespace) -> None:
    _on_a_seeded_database(args, _startup)


def _startup(dsn: str, upstream: FakeUpstream, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory, httpx.Client(timeout=60) as client:
        began = time.perf_counter()
        replica = _replica(Path(directory), upstream, dsn, "r")
        try:
            serving = time.perf_counter() - began
            memory = serving + _until(lambda: _stats(client, replica)["ready"], 0.05, timeout=1800)
            rss_ready = _rss_anon(replica.process.pid)
            stats = _stats(client, replica)
            print(f"/ready after {serving:.2f} s; memory ready ({stats['index']['memories']} memories searchable) after {memory:.1f} s "
                  f"(RssAnon {rss_ready / 2**20:.0f} MiB)", flush=True)
            found = client.post(f"{replica.url}/v1/memories/search", json={"query": "message 3 of session 42", "scope": "tenant", "min_score": -1})
            print(f"a search then (exact vector search until the index is built): {found.status_code}, "
                  f"{len(found.json().get('data', []))} hits", flush=True)
            try:
                built = memory + _until(lambda: _stats(client, replica)["index"]["hnsw_ready"], 0.5, timeout=args.index_timeout)
            except TimeoutError:
                print(f"HNSW index not built within {args.index_timeout:.0f} s more (it builds on an idle-priority thread: "
                      f"a busy machine starves it by design)", flush=True)
            else:
                print(f"HNSW index built after {built:.1f} s (RssAnon {_rss_anon(replica.process.pid) / 2**20:.0f} MiB)", flush=True)
        finally:
            replica.stop()


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _rewrite(dsn: str, count: int) -> None:
    """Rewrite ``count`` memory records unchanged, as a fleet replica writes: logged changes."""
    import asyncpg

    from proxy.storage.postgres_changes import FLEET_SETTING

    connection = await asyncpg.connect(dsn, server_settings={FLEET_SETTING: "on"})
    try:
        await connection.execute("UPDATE asp_records SET record = record WHERE (tenant, sid, kind, key) IN "
                                 "(SELECT tenant, sid, kind, key FROM asp_records WHERE kind = 'memory' ORDER BY random() LIMIT $1)", count)
    finally:
        await connection.close()


def restart(args: argparse.Namespace) -> None:
    _on_a_seeded_database(args, _restart)


def _restart(dsn: str, upstream: FakeUpstream, args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[float, float, float, float]]] = {"saved": [], "rebuilt": []}
    with tempfile.TemporaryDirectory() as directory, httpx.Client(timeout=60) as client:
        index_dir = Path(directory) / "r" / "data" / "index"
        plan = ["first"] + ["saved", "rebuilt"] * args.rounds
        for kind in plan:
            if kind == "rebuilt":
                for path in index_dir.glob(f"{TENANT}.fleet.*"):
                    path.unlink()
            if kind != "first" and args.changed:
                asyncio.run(_rewrite(dsn, args.changed))
            began = time.perf_counter()
            replica = _replica(Path(directory), upstream, dsn, "r")
            try:
                _until(lambda: _stats(client, replica)["ready"], 0.05, timeout=args.index_timeout)
                loaded, loaded_cpu = time.perf_counter() - began, _cpu_seconds(replica.process.pid)
                _until(lambda: _stats(client, replica)["index"]["hnsw_ready"], 0.05, timeout=args.index_timeout)
                seconds, cpu = time.perf_counter() - began, _cpu_seconds(replica.process.pid)
                counters = _stats(client, replica)["counters"]
                print(f"{kind:8s} memory ready after {loaded:6.1f} s (CPU {loaded_cpu:6.1f} s), HNSW ready after {seconds:6.1f} s "
                      f"(CPU {cpu:6.1f} s); index_loaded {counters.get('index_loaded', 0)}, "
                      f"index_rebuilds {counters.get('index_rebuilds', 0)}", flush=True)
                if kind in results:
                    results[kind].append((seconds, cpu, loaded, loaded_cpu))
            finally:
                replica.stop()
    for kind, rows in results.items():
        if rows:
            medians = [statistics.median(r[i] for r in rows) for i in range(4)]
            print(f"{kind}: medians over {len(rows)} starts: memory ready {medians[2]:.1f} s (CPU {medians[3]:.1f} s), "
                  f"HNSW ready {medians[0]:.1f} s (CPU {medians[1]:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("delay")
    measure.add_argument("--samples", type=int, default=50)
    measure.add_argument("--poll-ms", type=float, default=5.0)
    seeded = commands.add_parser("startup")
    seeded.add_argument("--sessions", type=int, default=10_000)
    seeded.add_argument("--messages", type=int, default=100)
    seeded.add_argument("--memories", type=int, default=100_000)
    seeded.add_argument("--index-timeout", type=float, default=1800.0, help="seconds to wait for the HNSW build after memory is ready")
    again = commands.add_parser("restart")
    again.add_argument("--sessions", type=int, default=2_000)
    again.add_argument("--messages", type=int, default=10)
    again.add_argument("--memories", type=int, default=20_000)
    again.add_argument("--rounds", type=int, default=3)
    again.add_argument("--changed", type=int, default=500, help="memories changed (logged) before each start")
    again.add_argument("--index-timeout", type=float, default=1800.0)
    args = parser.parse_args()
    {"delay": delay, "startup": startup, "restart": restart}[args.command](args)


if __name__ == "__main__":
    main()
