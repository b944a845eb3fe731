"""Full garbage collections wait for a moment without requests in flight (proxy/idle_gc.py)."""

from __future__ import annotations

import gc
import threading
import time

import openai
import pytest

from proxy.idle_gc import IdleCollector, disable_automatic_full_collection
from proxy.priority import Activity, activity
from proxy.server import keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_collection_waits_for_an_idle_moment_after_the_minimum_interval() -> None:
    clock = Clock()
    requests = Activity(clock)
    collector = IdleCollector(requests, idle=0.5, min_interval=60, max_interval=900, clock=clock)
    clock.now += 59
    assert not collector.due()  # too soon after the last one
    clock.now += 2
    assert collector.due()  # idle since it started
    requests.started()
    assert not collector.due()  # a request is in flight
    clock.now += 1
    requests.ended()
    assert not collector.due()  # the request ended just now
    clock.now += 0.5
    assert collector.due()
    assert collector.collect() >= 0
    assert collector.collections == 1 and collector.last_pause_ms is not None
    assert not collector.due()  # the interval starts over


def test_a_proxy_that_is_never_idle_still_collects_every_max_interval() -> None:
    clock = Clock()
    requests = Activity(clock)
    collector = IdleCollector(requests, idle=0.5, min_interval=60, max_interval=900, clock=clock)
    requests.started()
    clock.now += 899
    assert not collector.due()
    clock.now += 1
    assert collector.due()


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
    collector = proxy.call(_collector(proxy))
    collector.idle, collector.min_interval = 0.2, 0.3
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    upstream.latency = 1.5
    done = threading.Event()

    def slow() -> None:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "take your time"}])
        done.set()

    before = collector.collections
    threading.Thread(target=slow, daemon=True).start()
    time.sleep(0.2)
    assert activity.in_flight == 1
    assert done.wait(10)
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


async def _collector(proxy) -> IdleCollector:
    return proxy.app[keys.COLLECTOR]
