"""What the admin/edge defences of issue #20 cost per request: the Idempotency-Key fingerprint, the
quota checks, and choosing one page of the session listing.

    python bench/admin_limits_bench.py [--messages 50] [--sessions 20000]

In-process micro-measurements (no HTTP), medians of repeated runs; numbers in docs/SECURITY_ADMIN.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.pipeline import request_fingerprint  # noqa: E402
from proxy.quotas import QuotaSettings, Quotas  # noqa: E402
from proxy.records import Session  # noqa: E402
from proxy.server import pages  # noqa: E402


def per_call_us(fn, repeat: int, rounds: int = 7) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        samples.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(samples)


async def quota_us(settings: QuotaSettings, repeat: int) -> float:
    quotas = Quotas({"t": settings}, store=None)  # no tokens_per_day: the store is never touched
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeat):
            async with quotas.request("t"):
                pass
        samples.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=20000)
    args = parser.parse_args()
    body = {"model": "gpt-4o-mini", "temperature": 0.2, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "lorem ipsum dolor sit amet " * 8}
        for i in range(args.messages)]}
    print(f"fingerprint of a {args.messages}-message body: {per_call_us(lambda: request_fingerprint(body), 2000):.1f} us")
    print(f"quota admit+release, no limits: {asyncio.run(quota_us(QuotaSettings(), 20000)):.2f} us")
    print(f"quota admit+release, rpm+concurrency: "
          f"{asyncio.run(quota_us(QuotaSettings(requests_per_minute=10**9, concurrent_requests=10**6), 20000)):.2f} us")
    sessions = [Session(tenant="t", id=f"s{i}", created_at=i, last_active=(i * 7919) % args.sessions) for i in range(args.sessions)]
    cursor = pages.decode_cursor(pages.encode_cursor(sessions[0]))
    print(f"one page of 100 of {args.sessions} sessions: first {per_call_us(lambda: pages.newest_first(sessions, 100, None), 20) / 1000:.2f} ms, "
          f"after a cursor {per_call_us(lambda: pages.newest_first(sessions, 100, cursor), 20) / 1000:.2f} ms")


if __name__ == "__main__":
    main()
