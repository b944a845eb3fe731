"""One request cannot stall the proxy (issue #20 item 2): while a proxy process refuses a 4.1 MB
request or works through a new session that arrives with 4,000 messages, its event loop keeps
answering ``/health``. The maximum wait is printed (``-s``) and documented in docs/SECURITY.md;
the assertion is deliberately generous, since a shared 2-core machine is noisy."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, local_config, open_tenant, write_config
from tests.memory_helpers import wait_for_embedder

STALL_BOUND = 1.0  # seconds, any probe: doing the work inline held /health for 0.5-5 s here
TYPICAL_BOUND = 0.2  # seconds, the median probe: ~5 ms when the loop is free, 300+ ms when not


@contextmanager
def health_polled(proxy: ProxyProcess) -> Iterator[list[float]]:
    """Poll /health every 20 ms while the block runs; yields the list of wait times."""
    waits: list[float] = []
    failures: list[str] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(proxy.url + "/health").status_code
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                waits.append(time.perf_counter() - started)
                if status != 200:
                    failures.append(f"/health answered {status}")
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield waits
    finally:
        done.set()
        poller.join(60)
    assert not failures, failures[:3]


def _lag_buckets(proxy: ProxyProcess) -> dict[str, float]:
    """The cumulative counts of the proxy's event-loop lag histogram, by upper bound."""
    text = httpx.get(proxy.url + "/metrics", timeout=30).text
    found = re.findall(r'^asp_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return {le: float(count) for le, count in found}


def _post(proxy: ProxyProcess, body: bytes, session: str) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/chat/completions", content=body, timeout=120,
                      headers={"Content-Type": "application/json", "X-Session-ID": session})


def _agent_history(turns: int) -> list[dict]:
    """An agent session's history: user asks, assistant calls a tool, the tool answers, the
    assistant replies (four messages a turn, varied text so hashing and counting do real work)."""
    messages: list[dict] = [{"role": "system", "content": "You are a careful coding agent. " * 20}]
    for i in range(turns):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "read_file", "arguments": orjson.dumps({"path": f"src/module_{i}.py"}).decode()}}
        messages += [
            {"role": "user", "content": f"Step {i}: look at module {i} and tell me what the function parse_{i} returns."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"def parse_{i}(text):\n    return text.split({i})\n" * 5},
            {"role": "assistant", "content": f"parse_{i} splits its input on {i} and returns the list of parts."},
        ]
    return messages


def _measure(tmp_path: Path, upstream: FakeUpstream, work: Callable[[ProxyProcess], None], label: str) -> None:
    proxy = ProxyProcess(local_config(tmp_path, upstream.base_url)).start()
    try:
        wait_for_embedder(proxy)  # measured once started: loading the embedder competes for the GIL
        before = _lag_buckets(proxy)
        with health_polled(proxy) as waits:
            work(proxy)
        after = _lag_buckets(proxy)
        small = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "still there?"}]})
        assert _post(proxy, small, "after").status_code == 200
    finally:
        assert proxy.stop() == 0
    # The largest loop lag sampled during the work (its histogram bucket): /health's wait also
    # holds the client's and the OS scheduler's delays on a busy machine.
    new = {le: count - before.get(le, 0) for le, count in after.items()}
    lag = min((le for le in new if new[le] == new["+Inf"]), key=float)
    print(f"\n/health while {label}: {len(waits)} probes, median {statistics.median(waits) * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms; "
          f"the proxy's loop-lag monitor meanwhile: every sample <= {float(lag) * 1000:g} ms")
    assert waits and max(waits) < STALL_BOUND
    assert statistics.median(waits) < TYPICAL_BOUND  # a loop doing the work inline held most probes for 300+ ms


def test_health_answers_while_a_50000_pair_request_is_refused(tmp_path: Path, upstream: FakeUpstream) -> None:
    pairs = [m for i in range(50_000) for m in ({"role": "user", "content": f"question {i} about the weather"},
                                                 {"role": "assistant", "content": f"answer {i}: sunny"})]
    body = orjson.dumps({"model": "fake-model", "messages": pairs})
    assert len(body) > 4_000_000

    def work(proxy: ProxyProcess) -> None:
        for _ in range(3):
            response = _post(proxy, body, "huge")
            assert response.status_code == 413, response.text[:300]
            assert response.json()["error"]["code"] == "too_many_messages"

    _measure(tmp_path, upstream, work, "refusing 3 x 4.1 MB requests")


def test_health_answers_while_a_new_session_arrives_with_4000_messages(tmp_path: Path, upstream: FakeUpstream) -> None:
    history = _agent_history(1_000)[:4_000]
    assert len(history) == 4_000

    def work(proxy: ProxyProcess) -> None:
        for stream in (False, True):  # a new session each time: reconcile, count, assemble, record all of it
            body = orjson.dumps({"model": "fake-model", "messages": history, "stream": stream})
            response = _post(proxy, body, f"long-{stream}")
            assert response.status_code == 200, response.text[:300]
        stored = httpx.get(proxy.url + "/admin/sessions/long-False", timeout=120).json()["messages"]
        assert len(stored) == 4_001  # all 4,000 and the answer, recorded

    _measure(tmp_path, upstream, work, "serving two new 4,000-message sessions")


def test_large_bodies_are_counted_exactly_at_the_limit(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Bodies over 1 MiB are counted by the probe process before the proxy parses them: one
    message over the tenant's max_messages is a 413, exactly at it the request is served, and a
    large body that is not JSON is still the proxy's own 400."""
    tenant = open_tenant(upstream.base_url, limits={"max_messages": 50})
    proxy = ProxyProcess(write_config(tmp_path, {"local": tenant})).start()
    try:
        def body(count: int) -> bytes:
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "x" * 30_000} for i in range(count)]
            return orjson.dumps({"model": "fake-model", "messages": messages[:-1] + [{"role": "user", "content": "go"}]})

        over, at = body(51), body(50)
        assert len(over) > 1024 * 1024 and len(at) > 1024 * 1024
        refused = _post(proxy, over, "large")
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "too_many_messages", refused.text[:300]
        assert "holds 51 messages" in refused.json()["error"]["message"]
        assert _post(proxy, at, "large").status_code == 200
        broken = _post(proxy, at[:-2], "large")
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json", broken.text[:300]
    finally:
        assert proxy.stop() == 0
