"""Background work yields to requests, briefly."""

from __future__ import annotations

import threading
import time

from proxy.priority import ForegroundGate


def test_background_waits_while_a_request_is_in_progress() -> None:
    gate = ForegroundGate(max_pause=5.0)
    resumed = threading.Event()

    def background() -> None:
        gate.pause_for_requests()
        resumed.set()

    with gate.request():
        worker = threading.Thread(target=background)
        worker.start()
        assert not resumed.wait(0.2)  # held while the request runs
    assert resumed.wait(1.0)  # released when it ends
    worker.join()
    assert gate.pauses == 1


def test_no_wait_without_requests_and_never_past_max_pause() -> None:
    gate = ForegroundGate(max_pause=0.1)
    started = time.monotonic()
    gate.pause_for_requests()
    assert time.monotonic() - started < 0.05 and gate.pauses == 0
    with gate.request():  # a request stuck on I/O does not stall background work for long
        time.sleep(0.15)
        started = time.monotonic()
        gate.pause_for_requests()
        assert time.monotonic() - started < 0.05
        with gate.request():  # a newer one does, up to max_pause
            started = time.monotonic()
            gate.pause_for_requests()
            assert 0.05 < time.monotonic() - started < 0.5


def test_background_threads_run_at_the_lowest_priority_and_requests_do_not() -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    from proxy.priority import background_thread

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def policy() -> int:
        return os.sched_getscheduler(0)

    mine, my_policy = nice(), policy()
    with ThreadPoolExecutor(max_workers=1, initializer=background_thread) as pool:
        assert pool.submit(nice).result() == 19
        assert pool.submit(policy).result() == os.SCHED_IDLE
    # per thread: the event loop's thread keeps its priority and policy
    assert (nice(), policy()) == (mine, my_policy) and my_policy != os.SCHED_IDLE


def test_threads_that_hold_the_gil_get_nice_19_but_stay_schedulable() -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    from proxy.priority import low_priority_thread

    def state() -> tuple[int, int]:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)

    with ThreadPoolExecutor(max_workers=1, initializer=low_priority_thread) as pool:
        assert pool.submit(state).result() == (19, os.SCHED_OTHER)


async def test_the_indexing_batcher_embeds_on_a_lowered_priority_thread() -> None:
    import os

    import numpy as np

    from proxy.memory.embedder import EmbeddingBatcher
    from proxy.priority import background_thread

    seen = []
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    class Probe:
        dim, name = 2, "probe"

        def embed(self, texts):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return np.ones((len(texts), 2), dtype=np.float32) / np.sqrt(2)

    async with EmbeddingBatcher(Probe(), worker_initializer=background_thread) as index, EmbeddingBatcher(Probe()) as query:
        await index.embed("indexed in the background")
        await query.embed("a request's query")
    assert seen == [19, base]


def test_activity_is_quiet_only_after_the_last_request_ended_long_enough_ago() -> None:
    import asyncio

    from proxy.priority import Activity

    activity = Activity()

    async def scenario() -> list[bool]:
        activity.started()
        waited = asyncio.ensure_future(activity.quiet(0.1, within=5))
        await asyncio.sleep(0.3)
        pending = not waited.done()  # a request in flight: never quiet
        activity.ended()
        ended = time.monotonic()
        quiet = await waited
        return [pending, quiet, time.monotonic() - ended >= 0.1]

    assert asyncio.run(scenario()) == [True, True, True]

    async def busy() -> bool:
        activity.started()
        try:
            return await activity.quiet(0.1, within=0.2)
        finally:
            activity.ended()

    started = time.monotonic()
    assert asyncio.run(busy()) is False and time.monotonic() - started < 1
