"""Admin writes under the session lock, idempotency fingerprints, tenant-scoped admin views."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant, start_thread, write_config


def ask(proxy: ProxyThread, session: str, text: str, key: str = "x", **headers: str):
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    return sdk.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": text}], extra_headers={"X-Session-ID": session, **headers})


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_fork_onto_a_session_being_created_is_refused_and_the_request_keeps_it(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    ask(proxy, "source", "one")
    ask(proxy, "source", "two")
    upstream.latency = 1.5  # the request on the new id stays in flight while the fork is tried
    before = len(upstream.chat_requests)
    in_flight = threading.Thread(target=ask, args=(proxy, "target", "mine"))
    in_flight.start()
    try:
        wait_for(lambda: len(upstream.chat_requests) > before)  # the proxy holds the target's lock now
        forked = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": "target"}, timeout=30)
    finally:
        in_flight.join(30)
    upstream.latency = 0
    assert forked.status_code == 409 and forked.json()["error"]["code"] == "session_exists"
    target = httpx.get(f"{proxy.url}/admin/sessions/target").json()
    assert [m["body"]["content"] for m in target["messages"]] == ["mine", "echo: mine"]
    assert "forked_from" not in target["session"]["extra"]
    # Onto an id that exists (the target now, or the source itself): 409, nothing changes.
    for new_id in ("target", "source"):
        again = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": new_id})
        assert again.status_code == 409 and again.json()["error"]["code"] == "session_exists"
    assert len(httpx.get(f"{proxy.url}/admin/sessions/target").json()["messages"]) == 2
    fresh = httpx.post(f"{proxy.url}/admin/sessions/source/fork", json={"session_id": "fresh"})
    assert fresh.status_code == 201 and fresh.json()["messages"] == 4


def test_rollback_waits_for_the_request_in_flight_and_keeps_its_turn_consistent(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    ask(proxy, "busy", "one")
    upstream.latency = 1.0
    before = len(upstream.chat_requests)
    in_flight = threading.Thread(target=ask, args=(proxy, "busy", "two"))
    in_flight.start()
    try:
        wait_for(lambda: len(upstream.chat_requests) > before)
        report = httpx.post(f"{proxy.url}/admin/sessions/busy/rollback", json={"turns": 1}, timeout=30)
    finally:
        in_flight.join(30)
    upstream.latency = 0
    # The rollback ran after the in-flight turn was recorded, so it reverted that turn.
    assert report.status_code == 200 and report.json()["reverted"] == [2, 3]
    messages = httpx.get(f"{proxy.url}/admin/sessions/busy").json()["messages"]
    assert [(m["body"]["content"], m["active"]) for m in messages] == [
        ("one", True), ("echo: one", True), ("two", False), ("echo: two", False)]


def test_idempotency_key_with_a_different_body_is_a_422_not_the_old_answer(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    url, headers = f"{proxy.url}/v1/chat/completions", {"X-Session-ID": "pay", "Idempotency-Key": "order-7"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "pay 10 EUR"}], "temperature": 0}
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 200
    # The same request, keys in another order: a retry, answered from the record.
    reordered = {"temperature": 0, "messages": body["messages"], "model": "fake-model"}
    retry = httpx.post(url, json=reordered, headers=headers)
    assert retry.headers["idempotent-replayed"] == "true" and retry.json()["id"] == first.json()["id"]
    changed = httpx.post(url, json=body | {"messages": [{"role": "user", "content": "pay 1000 EUR"}]}, headers=headers)
    assert changed.status_code == 422
    error = changed.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["type"] == "invalid_request_error"
    assert len(upstream.chat_requests) == 1  # neither the retry nor the changed request reached the model
    messages = httpx.get(f"{proxy.url}/admin/sessions/pay").json()["messages"]
    assert [m["body"]["content"] for m in messages] == ["pay 10 EUR", "echo: pay 10 EUR"]
