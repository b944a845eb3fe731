"""What each persistence mode costs per request and in throughput, side by side in one run.

    python bench/persistence_bench.py [--requests 300] [--rounds 3] [--concurrency 1 16]

One proxy process per mode (sync, hybrid with routine turns, async, checkpoint), all against the
same instant fake upstream, driven in interleaved rounds by an aiohttp client: each request
appends a turn to its client's session (full history resent, ~20 messages). Prints median
per-request latency (p50/p99) and requests/s per mode and concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.harness import ProxyProcess, open_tenant, write_config  # noqa: E402

MODES = ("sync", "hybrid", "async", "checkpoint")


async def drive(base_url: str, requests: int, concurrency: int, tag: str) -> tuple[list[float], float]:
    latencies: list[float] = []
    per_client = max(1, requests // concurrency)

    async def client(http: aiohttp.ClientSession, index: int) -> None:
        history = [{"role": "system", "content": "bench"}]
        session = f"{tag}-{index}-{time.monotonic_ns()}"
        for turn in range(per_client):
            if len(history) > 20:
                history, session = history[:1], f"{session}-n"
            history.append({"role": "user", "content": f"turn {turn}: " + "words " * 30})
            started = time.perf_counter()
            async with http.post(f"{base_url}/chat/completions", json={"model": "fake-model", "messages": history}, headers={"X-Session-ID": session}) as response:
                body = await response.json()
            latencies.append(time.perf_counter() - started)
            history.append(body["choices"][0]["message"])

    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(concurrency)))
        return latencies, len(latencies) / (time.perf_counter() - started)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    results: dict[str, dict[int, dict[str, list[float]]]] = {m: {c: {"p50": [], "p99": [], "rps": []} for c in args.concurrency} for m in MODES}
    with FakeUpstream.run_in_thread() as upstream:
        proxies = {}
        for mode in MODES:
            persistence = {"mode": mode} if mode != "checkpoint" else {"mode": mode, "checkpoint_every_messages": 10}
            config = write_config(Path(tempfile.mkdtemp(prefix=f"persist-{mode}-")), {"local": open_tenant(upstream.base_url, persistence=persistence)})
            proxies[mode] = ProxyProcess(config).start()
        try:
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    for mode in MODES:  # interleaved: machine noise hits every mode alike
                        latencies, rps = asyncio.run(drive(proxies[mode].base_url, args.requests, concurrency, f"{mode}{round_}"))
                        results[mode][concurrency]["p50"].append(quantile(latencies, 0.5) * 1000)
                        results[mode][concurrency]["p99"].append(quantile(latencies, 0.99) * 1000)
                        results[mode][concurrency]["rps"].append(rps)
        finally:
            for proxy in proxies.values():
                proxy.stop()
    table = {mode: {f"c={c}": {k: round(statistics.median(v), 2) for k, v in stats.items()} for c, stats in per_mode.items()} for mode, per_mode in results.items()}
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
