"""Logs of a real `agent-state-proxy serve`: JSON lines, one access line per request, upstream
errors with their status, litellm's lines once, and no secret even at DEBUG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, keyed_tenant, write_config

PROXY_KEY = "team-proxy-key-0123456789"
UPSTREAM_KEY = "upstream-secret-key"  # what the fake upstream expects (tests/conftest.py)


def _lines(proxy: ProxyProcess) -> list[dict]:
    """Every line the process wrote, parsed: a line that is not JSON fails the test."""
    text = proxy.log_path.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _wait_for(proxy: ProxyProcess, match, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in _lines(proxy) if match(entry)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(params=[False])
def json_proxy(request, tmp_path: Path, upstream: FakeUpstream):
    """The proxy logging JSON at DEBUG; with a litellm route when the test asks (parametrize
    True): only then, since its background import of litellm delays the process's exit."""
    team = keyed_tenant(upstream.base_url, PROXY_KEY)
    if request.param:
        team["models"]["via-litellm"] = {"model": "openai/fake-model", "api_base": upstream.base_url,
                                         "api_key": UPSTREAM_KEY, "path": "litellm"}
    team["memory"] = {"enabled": False}  # no embedder to load: these tests are about logs
    path = write_config(tmp_path, {"team": team})
    proxy = ProxyProcess(path, env={"ASP_LOG_FORMAT": "json", "ASP_LOG_LEVEL": "DEBUG"}).start()
    try:
        yield proxy
    finally:
        assert proxy.stop() == 0


def test_one_json_access_line_per_request_with_tenant_session_status_and_tokens(json_proxy: ProxyProcess) -> None:
    sdk = openai.OpenAI(base_url=json_proxy.base_url, api_key=PROXY_KEY, max_retries=0)
    reply = sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hello logs"}], extra_headers={"X-Session-ID": "log-session"})
    request_id = reply.headers["X-Request-ID"]
    access = _wait_for(json_proxy, lambda e: e.get("event") == "access" and e.get("request_id") == request_id)
    assert len(access) == 1, access
    line = access[0]
    assert line["route"] == "/v1/chat/completions" and line["method"] == "POST" and line["status"] == 200
    assert line["tenant"] == "team" and line["session"] == "log-session" and line["upstream_status"] == 200
    assert line["prompt_tokens"] == reply.parse().usage.prompt_tokens > 0
    assert line["completion_tokens"] == reply.parse().usage.completion_tokens > 0
    assert line["added_ms"] >= 0 and line["duration_ms"] >= line["added_ms"]
    assert line["level"] == "INFO" and line["logger"] == "agent_state_proxy.access"
    # A session id in the URL path is a field, never part of the route.
    httpx.get(f"{json_proxy.url}/admin/sessions/log-session", headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    admin = _wait_for(json_proxy, lambda e: e.get("event") == "access" and e.get("method") == "GET" and e.get("session") == "log-session")
    assert admin and admin[0]["route"] == "/admin/sessions/{session_id}" and admin[0]["status"] == 200


def test_an_upstream_error_is_logged_with_its_status_and_message(json_proxy: ProxyProcess, upstream: FakeUpstream) -> None:
    sdk = openai.OpenAI(base_url=json_proxy.base_url, api_key=PROXY_KEY, max_retries=0)
    upstream.fail_next(429, "slow down please")
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "too fast"}])
    upstream.fail_next(500, f"the backend broke; its key was {UPSTREAM_KEY}")
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "broken"}])
    errors = _wait_for(json_proxy, lambda e: e.get("event") == "upstream_error" and e.get("upstream_status") == 500)
    rate = [e for e in _lines(json_proxy) if e.get("event") == "upstream_error" and e.get("upstream_status") == 429]
    assert rate and "slow down please" in rate[0]["message"] and rate[0]["status"] == 429 and rate[0]["level"] == "WARNING"
    assert errors and "the backend broke" in errors[0]["message"] and "[redacted]" in errors[0]["message"]
    access = [e for e in _lines(json_proxy) if e.get("event") == "access" and e.get("route") == "/v1/chat/completions"]
    assert sorted((e["status"], e["upstream_status"]) for e in access) == [(429, 429), (500, 500)]


@pytest.mark.parametrize("json_proxy", [True], indirect=True)
def test_litellm_lines_appear_once_and_no_secret_is_logged_at_debug(json_proxy: ProxyProcess, upstream: FakeUpstream) -> None:
    sdk = openai.OpenAI(base_url=json_proxy.base_url, api_key=PROXY_KEY, max_retries=0)
    for n in range(2):
        sdk.chat.completions.create(model="via-litellm", messages=[{"role": "user", "content": f"through litellm {n}"}])
    sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "direct"}], stream=True).close()
    access = _wait_for(json_proxy, lambda e: e.get("event") == "access" and e.get("route") == "/v1/chat/completions")
    assert len(upstream.chat_requests) == 3
    entries = _lines(json_proxy)  # every line parsed as JSON: litellm's own handler wrote none
    litellm = [e for e in entries if e["logger"].startswith("LiteLLM")]
    assert litellm, "litellm logged nothing at DEBUG"
    # litellm's line for each call it made, once each (its own handler would add a second,
    # non-JSON copy, which _lines rejects).
    assert sum("Request to litellm" in e["message"] for e in litellm) == 2
    text = json_proxy.log_path.read_text()
    assert UPSTREAM_KEY not in text and PROXY_KEY not in text
    assert access
