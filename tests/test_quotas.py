"""Per-tenant quotas and rate limits through the real proxy: 429 + Retry-After, counted in /admin/usage."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from proxy.config import ConfigError, load_config
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, keyed_tenant, local_proxy, start_thread, write_config
from tests.memory_helpers import running
from tests.inflight_helpers import in_flight, upstream_held

KEY = "quota-tenant-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def limited(tmp_path: Path, upstream: FakeUpstream, memory: bool = False, **quotas) -> ProxyThread:
    tenant = keyed_tenant(upstream.base_url, KEY, quotas=quotas, memory={"enabled": memory})
    return start_thread(write_config(tmp_path, {"team": tenant}))


def chat(proxy: ProxyThread, session: str, text: str = "hello", **extra) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]} | extra
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=AUTH | {"X-Session-ID": session}, timeout=60)


def usage(proxy: ProxyThread) -> dict:
    return httpx.get(f"{proxy.url}/admin/usage", headers=AUTH).json()


def assert_refused(response: httpx.Response, code: str, longest_wait: int) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["param"] is None
    assert 1 <= int(response.headers["Retry-After"]) <= longest_wait


def test_requests_per_minute(tmp_path: Path, upstream: FakeUpstream) -> None:
    with limited(tmp_path, upstream, requests_per_minute=3) as proxy:
        assert [chat(proxy, f"s{i}").status_code for i in range(3)] == [200, 200, 200]
        refused = chat(proxy, "s3")
        assert_refused(refused, "rate_limit_exceeded", 60)
        assert len(upstream.chat_requests) == 3
        # The official SDK sees its own RateLimitError.
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
        report = usage(proxy)
        assert report["limits"]["requests_per_minute"] == 3 and report["current"]["requests_last_minute"] == 3
        assert report["refused"]["requests_per_minute"] == 2


def test_concurrent_requests(tmp_path: Path, upstream: FakeUpstream) -> None:
    with limited(tmp_path, upstream, concurrent_requests=1) as proxy:
        with upstream_held(upstream):
            slow = in_flight(upstream, chat, proxy, "first")
            assert usage(proxy)["current"]["concurrent_requests"] == 1
            assert_refused(chat(proxy, "second"), "rate_limit_exceeded", 1)
        slow.join(30)
        assert chat(proxy, "second").status_code == 200  # the slot is free again
        assert usage(proxy)["refused"]["concurrent_requests"] == 1


def test_tokens_per_day_counts_streams_too_and_survives_a_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    # The fake upstream reports ~1 token per 4 characters: 400 characters in, more echoed back.
    with limited(tmp_path, upstream, tokens_per_day=300) as proxy:
        assert chat(proxy, "t", "a" * 400).status_code == 200  # ~200 tokens: under the limit when it started
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH | {"X-Session-ID": "t"}, timeout=60,
                          json={"model": "fake-model", "stream": True, "stream_options": {"include_usage": True},
                                "messages": [{"role": "user", "content": "b" * 400}]}) as streamed:
            assert streamed.status_code == 200 and "[DONE]" in streamed.read().decode()
        used = usage(proxy)["current"]["tokens_today"]
        assert used >= 300
        assert_refused(chat(proxy, "t", "one more"), "quota_exceeded", 86400)
        calls = len(upstream.chat_requests)
    with limited(tmp_path, upstream, tokens_per_day=300) as proxy:  # same data directory
        assert usage(proxy)["current"]["tokens_today"] == used
        assert_refused(chat(proxy, "t", "after restart"), "quota_exceeded", 86400)
        assert len(upstream.chat_requests) == calls


def test_sessions_stored(tmp_path: Path, upstream: FakeUpstream) -> None:
    with limited(tmp_path, upstream, sessions=2) as proxy:
        assert chat(proxy, "one").status_code == 200 and chat(proxy, "two").status_code == 200
        assert_refused(chat(proxy, "three"), "quota_exceeded", 60)
        assert chat(proxy, "one", "more in an existing session").status_code == 200
        fork = httpx.post(f"{proxy.url}/admin/sessions/one/fork", json={"session_id": "copy"}, headers=AUTH)
        assert_refused(fork, "quota_exceeded", 60)
        assert httpx.delete(f"{proxy.url}/admin/sessions/two", headers=AUTH).status_code == 200
        assert chat(proxy, "three").status_code == 200
        assert usage(proxy)["refused"]["sessions"] == 2
        listed = httpx.get(f"{proxy.url}/admin/sessions", headers=AUTH).json()["data"]
        assert sorted(s["id"] for s in listed) == ["one", "three"]


def test_memories_stored(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = keyed_tenant(upstream.base_url, KEY, quotas={"memories": 2}, memory={"episodic": False})
    with running(write_config(tmp_path, {"team": tenant})) as proxy:
        url = f"{proxy.url}/v1/memories"
        for text in ("likes tea", "lives in Lyon"):
            assert httpx.post(url, json={"content": text}, headers=AUTH, timeout=60).status_code == 200
        assert_refused(httpx.post(url, json={"content": "third"}, headers=AUTH, timeout=60), "quota_exceeded", 60)
        assert len(httpx.get(url, headers=AUTH).json()["data"]) == 2
        assert usage(proxy)["refused"]["memories"] == 1


def test_the_open_local_tenant_is_unlimited_by_default(tmp_path: Path, upstream: FakeUpstream) -> None:
    with local_proxy(tmp_path, upstream.base_url) as proxy:
        for i in range(5):
            assert httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"X-Session-ID": f"s{i}"}).status_code == 200
        report = httpx.get(f"{proxy.url}/admin/usage").json()
        assert set(report["limits"].values()) == {None} and set(report["refused"].values()) == {0}
        assert report["current"]["tokens_today"] > 0


def test_an_operator_sees_every_tenants_usage(tmp_path: Path, upstream: FakeUpstream) -> None:
    from proxy.config import hash_key

    tenants = {"team": keyed_tenant(upstream.base_url, KEY, quotas={"requests_per_minute": 1}),
               "other": keyed_tenant(upstream.base_url, "other-key")}
    with start_thread(write_config(tmp_path, tenants, server={"operator_key_sha256": [hash_key("op-key")]})) as proxy:
        chat(proxy, "a")
        chat(proxy, "b")
        report = httpx.get(f"{proxy.url}/admin/usage", headers={"Authorization": "Bearer op-key"}).json()
        by_tenant = {u["tenant"]: u for u in report["data"]}
        assert by_tenant["team"]["refused"]["requests_per_minute"] == 1 and by_tenant["other"]["refused"]["requests_per_minute"] == 0
        own = httpx.get(f"{proxy.url}/admin/usage", headers={"Authorization": "Bearer other-key"}).json()
        assert own["tenant"] == "other" and "data" not in own


@pytest.mark.parametrize(("quotas", "message"), [
    ({"requests_per_minute": 0}, r"quotas\.requests_per_minute: must be null \(unlimited\) or an integer between 1 and"),
    ({"tokens_per_day": "lots"}, r"quotas\.tokens_per_day: must be null"),
    ({"sessions": True}, r"quotas\.sessions: must be null"),
    ({"bandwidth": 5}, r"quotas\.bandwidth: unknown key"),
    ([1], r"quotas: must be a mapping"),
])
def test_quotas_are_validated(tmp_path: Path, quotas, message: str) -> None:
    path = write_config(tmp_path, {"team": keyed_tenant("http://127.0.0.1:9/v1", KEY, quotas=quotas)})
    with pytest.raises(ConfigError, match=r"team\.yaml: " + message):
        load_config(path)


def test_every_protocol_shares_the_tenant_rate_limit(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The Responses API is no way around a tenant's limits."""
    with limited(tmp_path, upstream, requests_per_minute=2) as proxy:
        assert chat(proxy, "chat-1").status_code == 200
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key=KEY, max_retries=0)
        assert sdk.responses.create(model="fake-model", input="hello").output_text
        refused = httpx.post(f"{proxy.base_url}/responses", json={"model": "fake-model", "input": "again"}, headers=AUTH)
        assert_refused(refused, "rate_limit_exceeded", 60)
        assert usage(proxy)["refused"]["requests_per_minute"] == 1
