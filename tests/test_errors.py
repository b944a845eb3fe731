"""Bad input, auth and upstream failures: the right status, OpenAI's error shape, nothing lost."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread


def post(proxy: ProxyThread, body: bytes | dict, key: str | None = ALPHA_KEY, **headers: str) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=10)
    return httpx.post(f"{proxy.base_url}/chat/completions", content=body, headers=headers | {"Content-Type": "application/json"}, timeout=10)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


def sdk(proxy: ProxyThread, key: str = ALPHA_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        ({"messages": USER}, "invalid_model"),
        ({"model": "m", "messages": "hi"}, "invalid_messages"),
        ({"model": "m", "messages": []}, "invalid_messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "invalid_messages"),
        ({"model": "m", "messages": [{"role": "user", "content": 42}]}, "invalid_messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "invalid_messages"),
        ({"model": "m", "messages": USER, "stream": "yes"}, "invalid_type"),
        ({"model": "m", "messages": USER, "n": "2"}, "invalid_type"),
        ({"model": "m", "messages": USER, "api_base": "http://evil.example/v1"}, "forbidden_field"),
        ({"model": "m", "messages": USER, "base_url": "http://evil.example/v1"}, "forbidden_field"),
        ({"model": "m", "messages": USER, "api_key": "sk-steal"}, "forbidden_field"),
    ],
)
def test_malformed_requests_get_400(keyed_proxy: ProxyThread, upstream: FakeUpstream, body, code: str) -> None:
    error = assert_openai_error(post(keyed_proxy, body), 400)
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert upstream.chat_requests == []


def test_missing_and_unknown_keys_get_401(keyed_proxy: ProxyThread) -> None:
    assert assert_openai_error(post(keyed_proxy, {"model": "m", "messages": USER}, key=None), 401)["code"] == "invalid_api_key"
    assert "incorrect" in assert_openai_error(post(keyed_proxy, {"model": "m", "messages": USER}, key="wrong"), 401)["message"]
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed_proxy, "wrong").chat.completions.create(model="m", messages=USER)
    assert httpx.get(f"{keyed_proxy.url}/admin/sessions").status_code == 401


def test_unknown_model_gets_404(keyed_proxy: ProxyThread) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        sdk(keyed_proxy, BETA_KEY).chat.completions.create(model="no-such-model", messages=USER)
    assert error.value.body["code"] == "model_not_found"
    assert [m.id for m in sdk(keyed_proxy, BETA_KEY).models.list()] == ["fast"]


def test_oversized_body_gets_413(keyed_proxy: ProxyThread) -> None:
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert assert_openai_error(post(keyed_proxy, huge), 413)["code"] == "request_too_large"


def test_unknown_route_and_method_are_openai_shaped(keyed_proxy: ProxyThread) -> None:
    assert_openai_error(httpx.get(f"{keyed_proxy.base_url}/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{keyed_proxy.base_url}/chat/completions"), 405)


def test_tenants_are_isolated(keyed_proxy: ProxyThread) -> None:
    alpha, beta = sdk(keyed_proxy, ALPHA_KEY), sdk(keyed_proxy, BETA_KEY)
    same = {"X-Session-ID": "shared-name"}
    alpha.chat.completions.create(model="m", messages=[{"role": "user", "content": "alpha secret plan"}], extra_headers=same)
    beta.chat.completions.create(model="fast", messages=[{"role": "user", "content": "beta"}], extra_headers=same)
    headers = {"Authorization": f"Bearer {BETA_KEY}"}
    view = httpx.get(f"{keyed_proxy.url}/admin/sessions/shared-name", headers=headers).json()
    assert [m["body"]["content"] for m in view["messages"]] == ["beta", "echo: beta"]
    listed = httpx.get(f"{keyed_proxy.url}/admin/sessions", headers=headers).json()["data"]
    assert [s["tenant"] for s in listed] == ["beta"]
    # beta cannot erase alpha's session, only its own.
    alpha.chat.completions.create(model="m", messages=USER, extra_headers={"X-Session-ID": "alpha-only"})
    assert httpx.get(f"{keyed_proxy.url}/admin/sessions/alpha-only", headers=headers).status_code == 404
    assert httpx.delete(f"{keyed_proxy.url}/admin/sessions/alpha-only", headers=headers).status_code == 404
    assert httpx.get(f"{keyed_proxy.url}/admin/sessions/alpha-only", headers={"Authorization": f"Bearer {ALPHA_KEY}"}).status_code == 200


@pytest.mark.parametrize(("status", "expected", "exception"), [(429, 429, openai.RateLimitError), (500, 500, openai.InternalServerError), (503, 503, openai.InternalServerError)])
def test_upstream_errors_are_mapped_and_the_question_is_kept(keyed_proxy: ProxyThread, upstream: FakeUpstream, status: int, expected: int, exception: type) -> None:
    upstream.fail_next(status, "provider says no (key upstream-secret-key)")
    headers = {"X-Session-ID": f"fail-{status}"}
    with pytest.raises(exception) as error:
        sdk(keyed_proxy).chat.completions.create(model="m", messages=USER, extra_headers=headers)
    assert error.value.status_code == expected
    assert "provider says no" in error.value.message and "upstream-secret-key" not in error.value.message
    # The accepted question is kept; the retry attaches the answer to it without duplicating.
    sdk(keyed_proxy).chat.completions.create(model="m", messages=USER, extra_headers=headers)
    view = httpx.get(f"{keyed_proxy.url}/admin/sessions/fail-{status}", headers={"Authorization": f"Bearer {ALPHA_KEY}"}).json()
    assert [(m["role"], m["outcome"]) for m in view["messages"]] == [("user", "error"), ("assistant", "ok")]


def test_upstream_timeout_gets_504(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.hang_next()
    with pytest.raises(openai.APIStatusError) as error:
        sdk(keyed_proxy, BETA_KEY).chat.completions.create(model="fast", messages=USER)
    assert error.value.status_code == 504 and error.value.body["code"] == "upstream_timeout"


def test_mid_stream_failure_ends_with_an_error_event(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.script_reply("a fairly long answer that will be cut in the middle")
    upstream.fail_mid_stream(after_chunks=2)
    with httpx.stream("POST", f"{keyed_proxy.base_url}/chat/completions", headers={"Authorization": f"Bearer {ALPHA_KEY}", "X-Session-ID": "cut"},
                      json={"model": "m", "stream": True, "messages": USER}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-1] and "[DONE]" not in events[-1]
    view = httpx.get(f"{keyed_proxy.url}/admin/sessions/cut", headers={"Authorization": f"Bearer {ALPHA_KEY}"}).json()
    assert view["messages"][-1]["outcome"] == "error" and view["messages"][-1]["role"] == "assistant"


def test_stream_error_before_first_chunk_is_a_plain_http_error(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, "slow down")
    with pytest.raises(openai.RateLimitError):
        list(sdk(keyed_proxy).chat.completions.create(model="m", messages=USER, stream=True))


def test_concurrent_requests_of_one_session_refused_with_409_when_configured(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.latency = 0.5
    results: list[int] = []

    def call() -> None:
        try:
            sdk(keyed_proxy, BETA_KEY).chat.completions.create(model="fast", messages=USER, extra_headers={"X-Session-ID": "busy"})
            results.append(200)
        except openai.ConflictError:
            results.append(409)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200, 409]


def test_proxy_key_never_reaches_upstream_or_storage(keyed_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk(keyed_proxy).chat.completions.create(model="m", messages=USER, extra_headers={"X-Session-ID": "keys"})
    assert upstream.auth_headers[-1] == "Bearer upstream-secret-key"
    assert ALPHA_KEY not in str(upstream.requests)
    raw = keyed_proxy.call(_dump_store(keyed_proxy))
    assert ALPHA_KEY not in raw and "upstream-secret-key" not in raw


async def _dump_store(proxy: ProxyThread) -> str:
    from proxy.server import keys

    store = proxy.app[keys.STORE]
    parts = []
    for tenant in ("alpha", "beta"):
        for session in await store.list_sessions(tenant):
            parts.append(repr(session))
            parts.extend(repr(m) for m in await store.get_messages(tenant, session.id))
    return "\n".join(parts)


def test_a_wrong_key_is_401_even_from_loopback_beside_an_open_tenant(tmp_path, upstream: FakeUpstream) -> None:
    """The default install's shape: an open local tenant and a keyed one. A mistyped key must not
    land in the open tenant; no key does; the right key reaches its own tenant."""
    from tests.harness import keyed_tenant, open_tenant, start_thread, write_config

    local = open_tenant(upstream.base_url)
    del local["ignore_client_keys"]  # the shipped default, auto: refused once a tenant has keys
    path = write_config(tmp_path, {"default": local, "team": keyed_tenant(upstream.base_url, ALPHA_KEY)})
    body = {"model": "m", "messages": USER}
    with start_thread(path) as proxy:
        error = assert_openai_error(post(proxy, body, key=ALPHA_KEY + "-typo"), 401)
        assert error["code"] == "invalid_api_key" and "incorrect" in error["message"]
        with pytest.raises(openai.AuthenticationError):
            sdk(proxy, "sk-my-old-openai-key").chat.completions.create(model="m", messages=USER)
        assert post(proxy, body, key=None).status_code == 200
        assert post(proxy, body, key=ALPHA_KEY).status_code == 200
        sessions = {name: httpx.get(f"{proxy.url}/admin/sessions", headers=headers).json()["data"]
                    for name, headers in (("default", {}), ("team", {"Authorization": f"Bearer {ALPHA_KEY}"}))}
        assert len(sessions["default"]) == 1 and len(sessions["team"]) == 1
    assert len(upstream.chat_requests) == 2


@pytest.mark.parametrize(("setting", "keyed", "admitted"), [
    ("auto", False, True),  # the embedded defaults: no key anywhere, so none is wrong
    ("auto", True, False),
    (True, True, True),
    (False, False, False),
])
def test_ignore_client_keys_decides_for_an_unknown_key(tmp_path, upstream: FakeUpstream, setting, keyed: bool, admitted: bool) -> None:
    from tests.harness import keyed_tenant, open_tenant, start_thread, write_config

    tenants = {"default": open_tenant(upstream.base_url, ignore_client_keys=setting)}
    if keyed:
        tenants["team"] = keyed_tenant(upstream.base_url, ALPHA_KEY)
    with start_thread(write_config(tmp_path, tenants)) as proxy:
        response = post(proxy, {"model": "m", "messages": USER}, key="sk-my-old-openai-key")
        assert response.status_code == (200 if admitted else 401), response.text
        assert post(proxy, {"model": "m", "messages": USER}, key=None).status_code == 200
    assert "sk-my-old-openai-key" not in str(upstream.chat_requests) + str(upstream.auth_headers)
