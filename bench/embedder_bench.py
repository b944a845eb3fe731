"""Micro-benchmark for the local numpy all-MiniLM-L6-v2 embedder.

Prints model load time, RSS after load, the median latency of a single short
query, of a batch of 32 short queries, and of 32 concurrent requests through
:class:`EmbeddingBatcher`.  Single-threaded BLAS by default (``--threads N``
to change), since that is the per-core figure we care about.

    python bench/embedder_bench.py [--threads 1] [--repeat 200]

Reports only; nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    ap.add_argument("--repeat", type=int, default=200, help="single-query repetitions")
    ap.add_argument("--batch-repeat", type=int, default=20, help="batch repetitions")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # Must be set before numpy (and its BLAS) is imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio  # noqa: E402
import statistics  # noqa: E402

import numpy as np  # noqa: E402

from proxy.memory.embedder import EmbeddingBatcher, LocalMiniLM  # noqa: E402

QUERIES = [
    "What is the capital of France?",
    "user prefers dark mode",
    "How do I reset my password?",
    "summarise yesterday's meeting notes",
]


def _rss_mib() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def main() -> int:
    args = ARGS or _parse()
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    model = LocalMiniLM()
    load_s = time.perf_counter() - t0
    print(f"model load: {load_s * 1000:.0f} ms, RSS {_rss_mib():.0f} MiB "
          f"(+{_rss_mib() - rss0:.0f} MiB for the model)")
    print(f"BLAS threads: {args.threads}")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            print(f"  {info.get('internal_api')} {info.get('version')} "
                  f"{info.get('architecture')} threads={info.get('num_threads')}")
    except ImportError:
        pass

    for q in QUERIES:
        n_tok = len(model.tokenize([q])[0])
        ms = _median_ms(lambda q=q: model.embed([q]), args.repeat)
        print(f"single query ({n_tok:2d} tokens) {q!r}: median {ms:.2f} ms")

    batch = [f"{QUERIES[i % len(QUERIES)]} (variant {i})" for i in range(32)]
    ms = _median_ms(lambda: model.embed(batch), args.batch_repeat)
    print(f"batch of 32 short queries: median {ms:.1f} ms ({ms / 32:.2f} ms/query)")

    long_text = "The agent stores durable memories about the user. " * 40
    ms = _median_ms(lambda: model.embed([long_text]), max(5, args.batch_repeat // 2))
    print(f"single long text (256 tokens, truncated): median {ms:.1f} ms")

    async def concurrent() -> tuple[float, int]:
        async with EmbeddingBatcher(model, max_batch=32) as batcher:
            await batcher.embed("warm-up")
            runs = batcher.batches_run
            t = time.perf_counter()
            vecs = await asyncio.gather(*(batcher.embed(text) for text in batch))
            elapsed = time.perf_counter() - t
            assert np.stack(vecs).shape == (32, model.dim)
            return elapsed * 1000.0, batcher.batches_run - runs

    ms, calls = asyncio.run(concurrent())
    print(f"32 concurrent batcher.embed calls: {ms:.1f} ms total in {calls} model call(s)")
    print(f"RSS at end: {_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
