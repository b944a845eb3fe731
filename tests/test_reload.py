"""Configuration reload of a real `agent-state-proxy serve`: SIGHUP and a changed tenant file
apply a good configuration, a bad one leaves the running one serving, and SIGHUP never ends the
process or loses queued writes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, keyed_tenant, route, write_config

KEY = "reload-proxy-key-42"


def _tenant(upstream: FakeUpstream, **models: str) -> dict:
    tenant = keyed_tenant(upstream.base_url, KEY, memory={"enabled": False}, persistence={"mode": "async"})
    tenant["models"] = {alias: route(upstream.base_url, f"openai/{target}") for alias, target in models.items()}
    return tenant


def _write_tenant(path: Path, tenant: dict) -> None:
    # Written aside and renamed in: the watcher never reads half a file.
    aside = path.with_suffix(".tmp")
    aside.write_text(yaml.safe_dump({"name": "team"} | tenant))
    aside.replace(path)


def _chat(proxy: ProxyProcess, model: str, session: str = "reload") -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}", "X-Session-ID": session},
                      json={"model": model, "messages": [{"role": "user", "content": f"hello {model}"}]}, timeout=30)


def _until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.fixture
def running(tmp_path: Path, upstream: FakeUpstream):
    config = write_config(tmp_path, {"team": _tenant(upstream, fast="fake-model")})
    proxy = ProxyProcess(config).start()
    try:
        yield proxy, config.parent / "tenants" / "team.yaml"
    finally:
        proxy.stop()


def test_sighup_applies_a_new_model_alias_and_never_ends_the_process(running, upstream: FakeUpstream) -> None:
    proxy, tenant_file = running
    assert _chat(proxy, "fast").status_code == 200
    assert _chat(proxy, "smart").status_code == 404
    # The file changes and SIGHUP arrives at once; whichever reload comes first applies it.
    _write_tenant(tenant_file, _tenant(upstream, fast="fake-model", smart="fake-model-2"))
    proxy.process.send_signal(signal.SIGHUP)
    assert _until(lambda: _chat(proxy, "smart", session="after").status_code == 200)
    assert upstream.chat_requests[-1]["model"] == "fake-model-2"
    assert _until(lambda: "configuration reloaded" in proxy.log())
    proxy.process.send_signal(signal.SIGHUP)  # again, with nothing changed: still serving
    assert _until(lambda: proxy.log().count("configuration reloaded") >= 2)
    assert proxy.process.poll() is None and _chat(proxy, "fast").status_code == 200
    # Turns queued for the write-behind store (async persistence) survive: stop, start, read.
    assert proxy.stop() == 0
    proxy.start()
    with openai.OpenAI(base_url=proxy.base_url, api_key=KEY, max_retries=0) as sdk:
        sessions = {s["id"]: s for s in sdk.get("/../admin/sessions", cast_to=object)["data"]}
    assert sessions["reload"]["turns"] == 2 and sessions["after"]["turns"] >= 1


def test_a_bad_tenant_file_keeps_the_running_configuration_and_says_why(running, upstream: FakeUpstream) -> None:
    proxy, tenant_file = running
    broken = _tenant(upstream, fast="fake-model", smart="fake-model-2")
    broken["history"] = "sometimes"
    _write_tenant(tenant_file, broken)
    proxy.process.send_signal(signal.SIGHUP)
    assert _until(lambda: "reload" in proxy.log() and "history: must be one of" in proxy.log())
    line = next(line for line in proxy.log().splitlines() if "history: must be one of" in line)
    assert "previous configuration keeps serving" in line and "team.yaml" in line and "ERROR" in line
    assert _chat(proxy, "fast").status_code == 200  # the old configuration, unchanged
    assert _chat(proxy, "smart").status_code == 404
    tenant_file.write_text("models: [unclosed\n")  # not even YAML
    assert _until(lambda: "invalid YAML" in proxy.log())
    assert _chat(proxy, "fast").status_code == 200 and proxy.process.poll() is None


def test_a_changed_tenant_file_is_reloaded_without_a_signal(running, upstream: FakeUpstream) -> None:
    proxy, tenant_file = running
    assert _chat(proxy, "smart").status_code == 404
    _write_tenant(tenant_file, _tenant(upstream, fast="fake-model", smart="fake-model-2"))
    assert _until(lambda: _chat(proxy, "smart").status_code == 200)
    assert "team.yaml changed" in proxy.log()
    # A new tenant file is a change too: its key works once it is picked up.
    other = keyed_tenant(upstream.base_url, "second-tenant-key", memory={"enabled": False})
    (tenant_file.parent / "second.yaml").write_text(yaml.safe_dump({"name": "second"} | other))
    headers = {"Authorization": "Bearer second-tenant-key"}
    assert _until(lambda: httpx.get(f"{proxy.base_url}/models", headers=headers, timeout=10).status_code == 200)


def test_a_request_in_flight_finishes_on_the_configuration_it_started_with(running, upstream: FakeUpstream) -> None:
    import threading

    proxy, tenant_file = running
    results: list[httpx.Response] = []
    upstream.latency = 8.0  # the request stays in flight while the configuration changes under it
    in_flight = threading.Thread(target=lambda: results.append(_chat(proxy, "fast", session="in-flight")))
    in_flight.start()
    try:
        assert _until(lambda: len(upstream.chat_requests) == 1)
        _write_tenant(tenant_file, _tenant(upstream, smart="fake-model-2"))  # "fast" is gone
        proxy.process.send_signal(signal.SIGHUP)
        assert _until(lambda: "configuration reloaded" in proxy.log())
        assert in_flight.is_alive()  # the swap happened while it was in flight
    finally:
        upstream.latency = 0.0
        in_flight.join(60)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["message"]["content"]
    assert _chat(proxy, "fast").status_code == 404  # new requests see the new configuration
    sessions = httpx.get(f"{proxy.url}/admin/sessions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"]
    assert next(s for s in sessions if s["id"] == "in-flight")["turns"] == 1  # and it was recorded


def test_a_reload_applies_a_tenants_new_quota(running, upstream: FakeUpstream) -> None:
    proxy, tenant_file = running
    assert [_chat(proxy, "fast", session=f"q{i}").status_code for i in range(3)] == [200, 200, 200]
    _write_tenant(tenant_file, _tenant(upstream, fast="fake-model") | {"quotas": {"requests_per_minute": 1}})
    proxy.process.send_signal(signal.SIGHUP)
    refused = _until(lambda: (r := _chat(proxy, "fast", session="late")).status_code == 429 and r)
    assert refused and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_reload_keeps_the_restart_only_settings_and_applies_the_rest(tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.server.reload import _keep_restart_only

    old = load_config(write_config(tmp_path / "old", {"t": keyed_tenant("http://h/v1", "k")}, server={"port": 9001}))
    tenant = keyed_tenant("http://h/v1", "k", history="client")
    new = load_config(write_config(tmp_path / "new", {"t": tenant}, server={"port": 9002, "metrics": {"enabled": False}},
                                   storage={"data_dir": str(tmp_path / "other"), "flush_interval_ms": 5}))
    kept, fixed = _keep_restart_only(new, old)
    assert fixed == ["server.port", "storage.data_dir", "storage.flush_interval_ms"]
    assert (kept.port, kept.data_dir, kept.flush_interval) == (9001, old.data_dir, old.flush_interval)
    assert kept.tenants["t"].history == "client" and not kept.metrics.enabled  # the rest takes effect
