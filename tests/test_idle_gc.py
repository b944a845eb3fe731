"""Full garbage collections wait for a moment without requests in flight (proxy/idle_gc.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import openai
import pytest

from proxy.idle_gc import IdleCollector, disable_automatic_full_collection
from proxy.priority import Activity, activity


def _run_for(collector: IdleCollector, steps: list[tuple[float, object]]) -> list[int]:
    """Run the collector's loop; after each (delay, action) step, note how many collections ran."""

    async def scenario() -> list[int]:
        task = asyncio.ensure_future(collector.run())
        seen = []
        try:
            for delay, action in steps:
                await asyncio.sleep(delay)
                seen.append(collector.collections)
                if callable(action):
                    action()
        finally:
            task.cancel()
        return seen

    return asyncio.run(scenario())


def test_a_full_collection_waits_for_an_idle_moment_after_the_minimum_interval() -> None:
    requests = Activity()
    collector = IdleCollector(requests, idle=0.2, min_interval=0.3, max_interval=60)
    seen = _run_for(collector, [
        (0.2, requests.started),  # too soon after the start; then a request comes in
        (0.5, requests.ended),  # in flight all along
        (0.1, None),  # the request ended just now
        (0.4, None),  # quiet for long enough
    ])
    assert seen[:3] == [0, 0, 0] and seen[3] >= 1
    assert collector.last_pause_ms is not None


def test_a_proxy_that_is_never_idle_still_collects_every_max_interval() -> None:
    requests = Activity()
    requests.started()
    collector = IdleCollector(requests, idle=0.2, min_interval=0.1, max_interval=0.4)
    seen = _run_for(collector, [(0.3, None), (0.5, None)])
    assert seen[0] == 0 and seen[1] >= 1


def test_serve_collects_generation_two_only_when_asked() -> None:
    before = gc.get_threshold()
    try:
        disable_automatic_full_collection()
        young, middle, old = gc.get_threshold()
        assert (young, middle) == (700, 50) and old >= 1 << 30
    finally:
        gc.set_threshold(*before)


def test_the_proxy_collects_only_between_requests(proxy, upstream) -> None:
    """Through the real app: no collection while a slow request is in flight, one soon after
    it ended; streamed and failed requests are counted out too."""
    collector = IdleCollector(activity, idle=0.2, min_interval=0.3)  # fed by the app's middleware
    running = proxy.call(_start(collector))
    try:
        _requests_then_quiet(proxy, upstream, collector)
    finally:
        proxy.call(_stop(running))


def _requests_then_quiet(proxy, upstream, collector: IdleCollector) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    upstream.latency = 3.0
    done = threading.Event()

    def slow() -> None:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "take your time"}])
        done.set()

    threading.Thread(target=slow, daemon=True).start()
    arrived = time.monotonic() + 2.5  # the upstream holds the request 3 s once it arrives
    while activity.in_flight == 0 and time.monotonic() < arrived:
        time.sleep(0.01)
    assert activity.in_flight == 1
    # Counted from the moment it is in flight: before that the proxy was idle and may collect
    # (on a loaded machine the request can take a while to arrive).
    before = collector.collections
    assert done.wait(15)
    during = collector.collections
    assert during == before  # nothing ran while the request was in flight
    upstream.latency = 0
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", messages="not a list")
    assert activity.in_flight == 0
    deadline = time.monotonic() + 5
    while collector.collections == during and time.monotonic() < deadline:
        time.sleep(0.05)
    assert collector.collections > during and activity.in_flight == 0


async def _start(collector: IdleCollector) -> asyncio.Future:
    return asyncio.ensure_future(collector.run())


async def _stop(running: asyncio.Future) -> None:
    running.cancel()


def test_an_idle_collection_returns_the_freed_heap_to_the_os() -> None:
    """glibc keeps freed heap pages; the idle collection hands them back (malloc_trim)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: freeing alone must not return it here

    def anon_kb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

    try:
        blocks = [libc.malloc(64 << 10) for _ in range(800)]  # 50 MB of heap (below the mmap threshold)
        for block in blocks:
            ctypes.memset(block, 1, 64 << 10)
        for block in blocks[:-1]:  # the last one keeps the heap's top in place
            libc.free(block)
        held = anon_kb()
        IdleCollector(Activity()).collect()
        assert anon_kb() < held - 30_000
        libc.free(blocks[-1])
    finally:
        libc.mallopt(-1, 128 << 10)  # glibc's default
