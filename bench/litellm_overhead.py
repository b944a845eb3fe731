"""litellm's own per-call overhead: the same request through litellm.acompletion and the direct path.

    python bench/litellm_overhead.py [--requests 300] [--rounds 3]

Both paths go through the proxy's Upstream class to the same instant fake upstream over real
HTTP, interleaved in rounds; the difference is what litellm adds per call in-process. This is
why `path: auto` sends openai/ models with an api_base over the direct aiohttp path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import ModelRoute  # noqa: E402
from proxy.upstream import Upstream  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402

HISTORY = [{"role": "system", "content": "bench"}] + [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "words " * 40} for i in range(40)
]


async def measure(upstream: Upstream, route, requests: int, stream: bool) -> list[float]:
    latencies = []
    body = {"messages": HISTORY, "stream": stream}
    for _ in range(requests):
        started = time.perf_counter()
        if stream:
            async for _chunk in upstream.stream(route, body, 30):
                pass
        else:
            await upstream.complete(route, body, 30)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def main_async(requests: int, rounds: int) -> dict:
    results: dict[str, list[float]] = {}
    async with FakeUpstream.start() as fake:
        fake.keep_requests = 0 if hasattr(fake, "keep_requests") else None
        upstream = Upstream()
        await upstream.start()
        direct = ModelRoute(model="openai/fake-model", api_base=fake.base_url, api_key="x", path="direct").resolve("m")
        via_litellm = ModelRoute(model="openai/fake-model", api_base=fake.base_url, api_key="x", path="litellm").resolve("m")
        await measure(upstream, via_litellm, 5, False)  # import and warm litellm outside the timing
        for _ in range(rounds):
            for name, route in (("direct", direct), ("litellm", via_litellm)):
                for stream in (False, True):
                    key = f"{name} {'SSE' if stream else 'JSON'}"
                    results.setdefault(key, []).append(statistics.median(await measure(upstream, route, requests, stream)))
                    fake.requests.clear()
        await upstream.close()
    summary = {key: round(statistics.median(values), 3) for key, values in results.items()}
    for kind in ("JSON", "SSE"):
        summary[f"litellm overhead {kind} (ms, p50)"] = round(summary[f"litellm {kind}"] - summary[f"direct {kind}"], 3)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args.requests, args.rounds)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
