"""GET /metrics through the real proxy: scraped after OpenAI SDK traffic, parsed with
prometheus_client's own parser, every family checked to move the way the traffic says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, MetricsSettings, hash_key, load_config
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, local_config, open_tenant, start_thread, write_config
from tests.memory_helpers import SLOW_OK, chat, drain, running, wait_for_embedder

OPERATOR_KEY = "operator-metrics-key-789"
SYSTEM = {"role": "system", "content": "You are terse."}


class Scrape:
    """One scrape, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for (n, have), v in self.samples.items() if n == name and wanted <= have)

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(have)[label] for (n, have) in self.samples if n == name and label in dict(have)}


def scrape(proxy: ProxyThread, key: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{proxy.url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def poll(proxy: ProxyThread, check, timeout: float = 20.0) -> Scrape:
    """Scrape until ``check(scrape)`` holds (background flushes and the lag monitor run on their own time)."""
    deadline = time.monotonic() + timeout
    while True:
        current = scrape(proxy)
        if check(current):
            return current
        assert time.monotonic() < deadline, "metrics never reached the expected values:\n" + current.text[-3000:]
        time.sleep(0.05)


def sdk(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="any-local-key", max_retries=0)


def test_scrape_after_sdk_traffic_counts_requests_stages_tokens_and_errors(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    client, history, usages = sdk(proxy), [SYSTEM], []
    for question in ("first question", "second question"):
        history.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": "metrics-a"})
        usages.append(reply.usage)
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    stream = client.chat.completions.create(model="fake-model", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "streamed"}], extra_headers={"X-Session-ID": "metrics-b"})
    usages.append([chunk.usage for chunk in stream if chunk.usage][-1])
    upstream.fail_next(503, "the provider is overloaded")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "fails"}], extra_headers={"X-Session-ID": "metrics-c"})

    got = scrape(proxy)
    chat_route = {"tenant": "local", "route": "/v1/chat/completions", "method": "POST"}
    assert got.value("asp_requests_total", **chat_route, status="200") == 3
    assert got.value("asp_requests_total", **chat_route, status="503") == 1
    assert got.value("asp_upstream_errors_total", tenant="local", provider="openai", status="503") == 1
    for stage in ("identify", "load", "reconcile", "context", "upstream", "record"):
        assert got.value("asp_stage_seconds_count", tenant="local", stage=stage) == 4, stage
        assert got.value("asp_stage_seconds_sum", tenant="local", stage=stage) > 0, stage
    assert got.value("asp_tokens_total", tenant="local", kind="prompt") == sum(u.prompt_tokens for u in usages)
    assert got.value("asp_tokens_total", tenant="local", kind="completion") == sum(u.completion_tokens for u in usages)
    # The second request resent the first one's prefix: the provider reported it as cached.
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert cached > 0 and got.value("asp_tokens_total", tenant="local", kind="cached") == cached
    assert got.value("asp_sessions_active", tenant="local") == 3
    assert got.value("asp_lmdb_map_size_bytes") >= got.value("asp_lmdb_used_bytes") > 0
    assert ("asp_write_queue_depth", frozenset()) in got.samples
    # Routine turns reach LMDB in write-behind batches; the loop-lag monitor samples every 0.1 s.
    later = poll(proxy, lambda s: s.value("asp_write_flush_seconds_count") >= 1 and s.value("asp_event_loop_lag_seconds_count") >= 3)
    assert later.value("asp_write_flushed_total") >= 1
    assert later.value("asp_event_loop_lag_max_seconds") >= later.value("asp_event_loop_lag_last_seconds") >= 0


def test_labels_are_route_patterns_never_session_ids(proxy: ProxyThread) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/s/secret-session-4711/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-User-ID": "user-0815"})
    assert httpx.get(f"{proxy.url}/admin/sessions/secret-session-4711").status_code == 200
    assert httpx.get(f"{proxy.url}/no/such/page").status_code == 404
    got = scrape(proxy)
    assert got.value("asp_requests_total", route="/s/{session_id}/v1/chat/completions", status="200") == 1
    assert got.value("asp_requests_total", route="/admin/sessions/{session_id}", method="GET", status="200") == 1
    assert got.value("asp_requests_total", route="unmatched", status="404") == 1
    assert "secret-session-4711" not in got.text and "user-0815" not in got.text and "/no/such/page" not in got.text


def test_compaction_savings_are_counted_as_saved_tokens(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, context={"max_context_tokens": 600, "reserve_completion_tokens": 100}, memory={"enabled": False})
    saved = 0
    with start_thread(write_config(tmp_path, {"local": tenant})) as running_proxy:
        client, history = sdk(running_proxy), []
        for turn in range(12):
            history.append({"role": "user", "content": f"Turn {turn}: " + "a long detail about the project plan " * 12})
            raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": "long"})
            saved += int(raw.headers["x-context-tokens-saved"])
            history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
        got = scrape(running_proxy)
    assert saved > 0  # the history outgrew the budget: compaction sent less than all of it
    assert got.value("asp_tokens_total", tenant="local", kind="saved") == saved


def test_memory_recalls_are_timed(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK})
    with running(write_config(tmp_path, {"local": tenant})) as memory_proxy:
        chat(memory_proxy, "We chose the Alfama Lighthouse hotel for the Lisbon offsite.", user="alice", session="one")
        drain(memory_proxy)
        chat(memory_proxy, "Which hotel did we choose for the offsite?", user="alice", session="two")
        got = scrape(memory_proxy)
    assert got.value("asp_memory_recall_seconds_count", tenant="local") >= 1
    assert got.value("asp_stage_seconds_count", tenant="local", stage="recall") >= 1
    assert ("asp_memory_budget_misses_total", frozenset({("tenant", "local")})) not in got.samples  # within a 5 s budget


def test_a_recall_over_its_budget_is_counted_as_a_miss(tmp_path: Path) -> None:
    # The embedding model answers in 0.3 s; the budget is 50 ms: the recall cannot make it.
    with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key", latency=0.3) as slow:
        tenant = open_tenant(slow.base_url, memory={"latency_budget_ms": 50, "embedder": "fake-embedding"})
        with running(write_config(tmp_path, {"local": tenant})) as memory_proxy:
            wait_for_embedder(memory_proxy)
            chat(memory_proxy, "We chose the Alfama Lighthouse hotel for the Lisbon offsite.", user="alice", session="one")
            drain(memory_proxy)
            _, headers = chat(memory_proxy, "Which hotel did we choose for the offsite?", user="alice", session="two")
            got = scrape(memory_proxy)
    assert headers["x-memory-status"] == "budget-exceeded"
    assert got.value("asp_memory_budget_misses_total", tenant="local") == 1
    assert got.value("asp_memory_recall_seconds_count", tenant="local") == 1


@pytest.fixture
def operator_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    path = local_config(tmp_path, upstream.base_url, {"server": {"operator_key_sha256": [hash_key(OPERATOR_KEY)]}})
    with start_thread(path) as started:
        yield started


def test_an_operator_key_is_required_once_configured(operator_proxy: ProxyThread) -> None:
    assert httpx.get(f"{operator_proxy.url}/metrics").status_code == 401
    wrong = httpx.get(f"{operator_proxy.url}/metrics", headers={"Authorization": "Bearer not-the-operator"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert OPERATOR_KEY not in wrong.text
    assert "asp_requests_total" in scrape(operator_proxy, OPERATOR_KEY).text


def test_without_an_operator_key_only_loopback_may_read() -> None:
    open_default = MetricsSettings()
    assert open_default.allows("", "127.0.0.1") and open_default.allows("", "::1")
    assert not open_default.allows("", "172.17.0.1") and not open_default.allows("anything", "10.0.0.5")
    keyed = MetricsSettings(key_hashes=frozenset({hash_key(OPERATOR_KEY)}))
    assert keyed.allows(OPERATOR_KEY, "10.0.0.5") and not keyed.allows("", "127.0.0.1")


def test_metrics_can_be_turned_off(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = local_config(tmp_path, upstream.base_url, {"server": {"metrics": {"enabled": False}}})
    with start_thread(path) as started:
        response = httpx.get(f"{started.url}/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("metrics, message", [
    ({"key_sha256": ["0" * 64]}, "server.metrics.key_sha256: unknown key"),
    ({"enabled": "yes"}, "server.metrics.enabled: must be true or false"),
    ({"port": 9100}, "server.metrics.port: unknown key"),
    ("on", "server.metrics: must be a mapping"),
])
def test_bad_metrics_settings_name_the_file_and_key(tmp_path: Path, metrics: Any, message: str) -> None:
    path = local_config(tmp_path, "http://127.0.0.1:1/v1", {"server": {"metrics": metrics}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and message in str(caught.value)
