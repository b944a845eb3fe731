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
