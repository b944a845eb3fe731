"""Fleet scaling on one PostgreSQL: state-only added latency (PostgreSQL vs LMDB) at c=1 and
requests/s of 1, 2 and 3 replicas at c=16, with where the CPU went.

Every part is its own process, as in bench/run.py: the fake upstream (bench/upstream.py), the load
generator (bench/loadgen.py, the same agent-like workload: each turn resends the history, ~15 KB),
the ``serve`` replicas, and a private PostgreSQL cluster with ``fsync`` on. The tenant is
bench/run.py's "state" tenant (session state only: context management and memory off).

Targets:
- ``direct``   the client straight to the fake upstream: the floor "added" is measured against;
- ``lmdb``     one replica on LMDB (the default store, hybrid persistence);
- ``pg-one``   one replica on PostgreSQL, ``replicas: one`` (routine turns batched);
- ``pg-many``  ``replicas: many`` (fleet mode: every turn committed before it is acknowledged, a
               session advisory lock per request, nothing cached), with 1, 2 or 3 replicas behind
               a per-request round-robin (the load generator spreads requests over them).

Each round (the order rotated): c=1 latency of direct, lmdb, pg-one and pg-many x1 (``added`` is
a target's p50 minus direct's in the same round), then c=``--concurrency`` throughput of lmdb x1
and pg-many x1, x2, x3, sampling the CPU time of each process group (/proc) over the step.
Medians over rounds.

    PYTHONPATH=. python bench/fleet_scale.py [--rounds 3] [--requests 300] [--duration 10] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402  (bench/run.py: LoadGen, the "state" tenant)
from fleet_cost import _fsync_on  # noqa: E402
from tests.harness import ProxyProcess, free_port, write_config  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICKS


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


class Rig:
    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.directory, self.args = directory, args
        self.server = PostgresServer().start()
        asyncio.run(_fsync_on(self.server))
        port = free_port()
        self.upstream = subprocess.Popen([sys.executable, str(BENCH / "upstream.py"), "--port", str(port)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.upstream.stdout is not None and b"listening" in self.upstream.stdout.readline()
        self.upstream_base = f"http://127.0.0.1:{port}/v1"
        self.loadgen = bench_run.LoadGen(directory / "loadgen.log")
        self.tenant, _ = bench_run.state_tenant(self.upstream_base)
        self.run_id = secrets.token_hex(4)
        self.replicas: dict[str, list[ProxyProcess]] = {}

    def start(self, name: str, count: int, storage: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.replicas[name] = []
        for number in range(count):
            where = self.directory / f"{name}-{number}"
            config = write_config(where, {"bench": self.tenant}, storage={"data_dir": str(where / "data")} | storage)
            self.replicas[name].append(ProxyProcess(config, env=env).start(timeout=60))

    def urls(self, name: str, count: int | None = None) -> list[str]:
        if name == "direct":
            return [self.upstream_base + "/chat/completions"]
        return [r.base_url + "/chat/completions" for r in self.replicas[name][:count]]

    def groups(self, name: str, count: int) -> dict[str, list[int]]:
        postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        groups = {"replicas": [r.process.pid for r in self.replicas[name][:count]],
                  "postgres": [postmaster] + _children(postmaster),
                  "upstream": [self.upstream.pid], "loadgen": [self.loadgen.proc.pid]}
        return groups

    def latency(self, target: str, urls: list[str]) -> float:
        result = self.loadgen.run(target=f"{target}-c1", url=urls[0], urls=urls, concurrency=1, duration=0,
                                  min_requests=self.args.requests, max_requests=self.args.requests, run_id=self.run_id)
        if result["errors"]:
            raise RuntimeError(f"{target}: {result['errors']} errors, e.g. {result['error_sample']}")
        return statistics.median(result["ttlb_ms"])

    def throughput(self, name: str, count: int) -> tuple[float, dict[str, float]]:
        groups = self.groups(name, count)
        before = {group: _cpu_seconds(pids) for group, pids in groups.items()}
        urls = self.urls(name, count)
        result = self.loadgen.run(target=f"{name}-x{count}", url=urls[0], urls=urls, concurrency=self.args.concurrency,
                                  duration=self.args.duration, run_id=self.run_id)
        if result["errors"]:
            raise RuntimeError(f"{name} x{count}: {result['errors']} errors, e.g. {result['error_sample']}")
        cores = {group: (_cpu_seconds(pids) - before[group]) / result["elapsed"] for group, pids in groups.items()}
        return result["n"] / result["elapsed"], cores

    def close(self) -> None:
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.stop()
        self.loadgen.close()
        self.upstream.terminate()
        self.upstream.wait(10)
        self.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="c=1 requests per target and round")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput step")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="asp-fleet-scale-") as directory:
        rig = Rig(Path(directory), args)
        try:
            rig.start("lmdb", 1, {})
            for name, replicas, count in (("pg-one", "one", 1), ("pg-many", "many", 3)):
                dsn = asyncio.run(rig.server.new_database())
                rig.start(name, count, {"backend": "postgres", "postgres": {"dsn": "${BENCH_DATABASE_URL}", "replicas": replicas}},
                          env={"BENCH_DATABASE_URL": dsn})
            latency: dict[str, list[float]] = {}
            rates: dict[str, list[float]] = {}
            cpu: dict[str, list[dict[str, float]]] = {}
            c1 = [("direct", "direct"), ("lmdb", "lmdb"), ("pg-one", "pg-one"), ("pg-many x1", "pg-many")]
            scale = [("lmdb", 1), ("pg-many", 1), ("pg-many", 2), ("pg-many", 3)]
            for round_ in range(args.rounds):
                shift = round_ % len(c1)
                for label, name in c1[shift:] + c1[:shift]:
                    urls = rig.urls(name, 1)
                    latency.setdefault(label, []).append(rig.latency(label.replace(" ", "-"), urls))
                floor = latency["direct"][-1]
                for label, _ in c1[1:]:
                    latency.setdefault(f"{label} added", []).append(latency[label][-1] - floor)
                for name, count in scale[shift % len(scale):] + scale[:shift % len(scale)]:
                    rate, cores = rig.throughput(name, count)
                    rates.setdefault(f"{name} x{count}", []).append(rate)
                    cpu.setdefault(f"{name} x{count}", []).append(cores)
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f} req/s" for k, v in rates.items()), flush=True)
        finally:
            rig.close()
    print(f"\nc=1 latency, {args.requests} requests a round, median of {args.rounds} rounds (ms, whole request):")
    print(f"{'target':12} {'p50':>7} {'added p50':>10}")
    for label, _ in c1:
        added = latency.get(f"{label} added")
        print(f"{label:12} {statistics.median(latency[label]):7.2f} {statistics.median(added) if added else 0:10.2f}")
    # CPU per request is what a busy shared machine changes least: req/s follows the CPU time
    # the other processes leave; the CPU each request costs does not.
    print(f"\nc={args.concurrency} throughput, {args.duration:g} s a step, median of {args.rounds} rounds; "
          "CPU cores used over the step, and CPU ms per request:")
    print(f"{'target':12} {'req/s':>7} {'cores: replicas':>16} {'postgres':>9} {'all':>5} {'ms/req: replicas':>17} {'postgres':>9} {'all':>6}")
    for label, values in rates.items():
        cores = {group: statistics.median(c[group] for c in cpu[label]) for group in cpu[label][0]}
        rate, total = statistics.median(values), sum(cores.values())
        print(f"{label:12} {rate:7.0f} {cores['replicas']:16.2f} {cores['postgres']:9.2f} {total:5.2f} "
              f"{1000 * cores['replicas'] / rate:17.2f} {1000 * cores['postgres'] / rate:9.2f} {1000 * total / rate:6.2f}")


if __name__ == "__main__":
    main()
