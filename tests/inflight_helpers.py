"""Helpers for tests that need a request held in flight at the fake provider."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from tests.fake_upstream import FakeUpstream


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@contextlib.contextmanager
def upstream_held(upstream: FakeUpstream) -> Iterator[None]:
    """The fake provider answers nothing until the block ends: a request stays in flight meanwhile.

    (The responder blocks the fake's loop; requests the proxy refuses never reach it.)
    """
    gate = threading.Event()
    upstream.responder = lambda body: gate.wait(60) and None
    try:
        yield
    finally:
        gate.set()
        upstream.responder = None


def in_flight(upstream: FakeUpstream, target, *args) -> threading.Thread:
    """Start ``target`` in a thread and return once its request reached the provider."""
    before = len(upstream.chat_requests)
    thread = threading.Thread(target=target, args=args)
    thread.start()
    wait_for(lambda: len(upstream.chat_requests) > before)  # the proxy holds the session's lock now
    return thread
