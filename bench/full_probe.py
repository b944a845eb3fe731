"""A quick look at full mode: one seeded proxy, JSON requests at concurrency 1.

    python bench/full_probe.py --requests 300 [--rounds 3] [--burst 600] [--streams 2] [--workdir DIR]
    python bench/full_probe.py --requests 200 --streams 1 --warmup 240 --burst 60 --burst-streams 16 --pause 5

Seeds a store the way bench/run.py's `full` target is seeded (bench/seed_full.py: 100k memories
of the benchmark user, 500-turn sessions; built once under --workdir and copied per round),
starts the fake upstream and the proxy on it, waits for its HNSW index, then sends --requests
JSON requests at concurrency 1 from the benchmark's window client (the tail of a stored session,
rotating over --streams client streams' sessions: 2 streams are 18 sessions, which the proxy's
caches hold; 16 streams are the 46 sessions of bench/run.py's c=16 sweep step). With --burst N,
the measured requests follow a burst of N requests sent concurrently (one client per measured
session, or with --burst-streams K one client per stream of the first K, as bench/run.py's
sweep step at c=K), after --pause seconds, as bench/run.py's c=1 steps follow its throughput
sweeps: it shows what the indexing backlog and the sessions a burst pushed out of the caches
cost the next requests (printed: the first 24 of them, in order). Prints per round the absolute
latency percentiles, the proxy's CPU per request, its anonymous RSS, its file-backed RSS (and how
much of it is LMDB's data file), its peak RSS, its memory counters (recalls over budget,
degradations, episodic messages indexed during the round) and its recall and query-embedding
latencies.

For before/after checks of one change in a minute, not a substitute for bench/run.py (no
interleaving with other targets, no direct baseline: compare runs made back to back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402

from run_procs import cpu_seconds, http_json  # noqa: E402
from run_targets import full_tenant, write_proxy_config  # noqa: E402
from seed_full import seed, session_ids  # noqa: E402
from workload import BENCH_USER, WindowConversation, window_sessions  # noqa: E402

RUN_ID = "probe"
TURNS = 500


def _status_mb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return 0


def _mapped_mb(pid: int, name: str) -> int:
    """Resident MB of the process's mappings of files called ``name`` (/proc/PID/smaps)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5].endswith("/" + name)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total // 1024


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _wait_ready(proxy: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proxy.poll() is not None:
            raise SystemExit(f"the proxy exited:\n{log.read_text()[-3000:]}")
        try:
            stats = http_json(f"{url}/admin/memory", {}, timeout=10)
            index = stats.get("index") or {}
            if stats.get("ready") and index.get("hnsw_ready") and index.get("hnsw_entries", 0) > 0:
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit("the proxy's memory was not ready in time")


async def _drive(url: str, requests: int, conversations: list[WindowConversation]) -> list[float]:
    """``requests`` requests one after the other, round-robin over ``conversations``."""
    latencies = []
    async with aiohttp.ClientSession() as http:
        for i in range(requests):
            conversation = conversations[i % len(conversations)]
            session, body, text = conversation.next_request(False)
            started = time.perf_counter()
            async with http.post(f"{url}/v1/chat/completions", data=body, headers={
                    "Content-Type": "application/json", "X-Session-ID": session, "X-User-ID": BENCH_USER}) as response:
                raw = await response.read()
                if response.status != 200:
                    raise SystemExit(f"HTTP {response.status}: {raw[:300]!r}")
            latencies.append((time.perf_counter() - started) * 1000)
            conversation.record_reply(text, "echo: " + text)
    return latencies


async def _burst(url: str, requests: int, clients: list[list[WindowConversation]]) -> None:
    """``requests`` requests spread over the clients, all of them at once; each client goes
    round-robin over its conversations."""
    share = max(1, requests // len(clients))
    await asyncio.gather(*(_drive(url, share, conversations) for conversations in clients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--burst", type=int, default=0, help="requests sent concurrently right before the measured ones")
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=2, help="client streams whose sessions the requests rotate over")
    parser.add_argument("--warmup", type=int, default=20, help="requests before the burst (bench/run.py: ~240 c=1 requests a round)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between the burst and the measured requests")
    parser.add_argument("--burst-streams", type=int, default=0, help="send the burst as this many client streams, each round-robin over its sessions, as a bench/run.py sweep step at this concurrency does (default: one client per measured session)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asp-full-probe")
    parser.add_argument("--port", type=int, default=18902, help="the proxy's")
    parser.add_argument("--upstream-port", type=int, default=18901, help="the fake upstream's")
    args = parser.parse_args()

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    upstream_port = args.upstream_port
    upstream_url, url = f"http://127.0.0.1:{upstream_port}/v1", f"http://127.0.0.1:{args.port}"
    tenant, _ = full_tenant(upstream_url)
    seeded = max(args.streams, args.burst_streams)
    sessions = session_ids(RUN_ID, seeded)
    template = work / f"template-{args.memories}" if seeded == 2 else work / f"template-{args.memories}-{seeded}"
    if not template.exists():
        config = write_proxy_config(work / "seed-config", tenant, work / "seeding")
        shutil.rmtree(work / "seeding", ignore_errors=True)
        print("seeding:", seed(config, "bench", sessions, TURNS, args.memories), flush=True)
        shutil.move(str(work / "seeding"), template)

    log = work / "probe.log"
    for round_number in range(1, args.rounds + 1):
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(template, data)
        config = write_proxy_config(work / "config", tenant, data)
        upstream = _start([str(ROOT / "bench" / "upstream.py"), "--port", str(upstream_port)], log)
        proxy = _start(["-m", "proxy", "serve", "--config", str(config), "--port", str(args.port)], log)
        try:
            ready = _wait_ready(proxy, url, log)
            conversations = {session: WindowConversation(session, TURNS) for session in sessions}
            measured = [conversations[s] for s in session_ids(RUN_ID, args.streams)]
            asyncio.run(_drive(url, args.warmup, measured))  # warm-up
            if args.burst:
                if args.burst_streams:  # one client per stream, as in a bench/run.py sweep step
                    clients = [[conversations[s] for s in window_sessions(RUN_ID, i)] for i in range(args.burst_streams)]
                else:  # one client per session
                    clients = [[conversation] for conversation in measured]
                asyncio.run(_burst(url, args.burst, clients))
                time.sleep(args.pause)  # bench/run.py's other targets take their turns in between
            before = cpu_seconds(proxy.pid)
            in_order = asyncio.run(_drive(url, args.requests, measured))
            latencies = sorted(in_order)
            cpu_ms = (cpu_seconds(proxy.pid) - before) / args.requests * 1000
            stats = http_json(f"{url}/admin/memory", {}, timeout=10)
            n = len(latencies)
            print(json.dumps({
                "round": round_number, "ready_s": round(ready, 1), "requests": n,
                "p50_ms": round(statistics.median(latencies), 2), "p90_ms": round(latencies[int(n * 0.9)], 2),
                "p99_ms": round(latencies[min(n - 1, int(n * 0.99))], 2), "cpu_ms_per_request": round(cpu_ms, 2),
                "first_ms": [round(x) for x in in_order[:24]],
                "anon_mb": _status_mb(proxy.pid, "RssAnon"), "hwm_mb": _status_mb(proxy.pid, "VmHWM"),
                "file_mb": _status_mb(proxy.pid, "RssFile"), "lmdb_mapped_mb": _mapped_mb(proxy.pid, "data.mdb"),
                "memory_counters": stats.get("counters"), "recall_latency_ms": stats.get("recall_latency_ms"),
                "query_embedding_ms": stats.get("query_embedding_ms"),
            }), flush=True)
        finally:
            _stop(proxy)
            _stop(upstream)


if __name__ == "__main__":
    main()
