"""The fake upstream for benchmarks: tests/fake_upstream.py, with a bounded request log.

``FakeUpstream`` keeps every request it receives (``.requests``) so tests can inspect them;
over a benchmark's hundreds of thousands of ~15 KB requests that grows by gigabytes and makes
the garbage collector slower and slower, a drift that would hit every target. Here the log
keeps only the last 64 requests; everything else is the tests' server, unchanged.

    python bench/upstream.py --port 9999 [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_upstream import FakeUpstream  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each response")
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with FakeUpstream.start(port=args.port, host=args.host, latency=args.latency) as fake:
            fake.requests = deque(maxlen=64)  # type: ignore[assignment]  # append/clear/[-1] all work
            print(f"fake upstream listening on {fake.base_url}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
