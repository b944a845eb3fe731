"""Long-term memory end to end through the real proxy and the official OpenAI SDK: recall across
a user's sessions, provenance, degradation when the embedder is down, the latency budget."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, free_port, open_tenant, write_config
from tests.memory_helpers import SLOW_OK, chat, drain, injected_ids, memory_stats, memory_text, recalled_block, running, system_prompt, wait_for_embedder

HOTEL = "For the Lisbon offsite we settled on the Alfama Lighthouse hotel and a budget of 4200 euros."


@pytest.fixture
def memory_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "top_k": 3})
    with running(write_config(tmp_path, {"local": tenant})) as started:
        yield started


def test_remember_when_we_discussed_across_two_sessions_of_a_user(memory_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    chat(memory_proxy, HOTEL, user="alice", session="planning")
    chat(memory_proxy, "Also book a vegetarian dinner on Friday.", user="alice", session="planning")
    drain(memory_proxy)

    answer, headers = chat(memory_proxy, "Remember when we discussed the offsite hotel? Which one did we pick?", user="alice", session="later")
    assert answer.startswith("echo:")
    ids = injected_ids(headers)
    assert ids and int(headers["x-memory-tokens"]) > 0
    prompt = memory_text(upstream.chat_requests[-1])
    assert "Relevant memories from earlier conversations" in prompt
    assert "> " + HOTEL in prompt  # quoted data with its source session
    assert 'session "planning"' in prompt
    assert upstream.chat_requests[-1]["messages"][-1]["content"].startswith("Remember when")

    # Provenance: the recorded answer lists the memories that were injected.
    view = httpx.get(f"{memory_proxy.url}/admin/sessions/later").json()
    assistant = [m for m in view["messages"] if m["role"] == "assistant"][-1]
    assert assistant["injected"] == ids
    memory = httpx.get(f"{memory_proxy.url}/v1/memories/{ids[0]}").json()
    assert memory["session_id"] == "planning" and memory["user_id"] == "alice"


def test_nothing_is_injected_twice_when_it_is_already_in_the_context(memory_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    answer, _ = chat(memory_proxy, HOTEL, user="alice", session="one")
    drain(memory_proxy)
    history = [{"role": "user", "content": HOTEL}, {"role": "assistant", "content": answer}]
    _, headers = chat(memory_proxy, "Which hotel was it again?", user="alice", session="one", history=history)
    assert injected_ids(headers) == []
    assert recalled_block(upstream.chat_requests[-1]) == ""  # no memory block


def test_streaming_requests_get_memories_and_headers(memory_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    import openai

    chat(memory_proxy, HOTEL, user="alice", session="planning")
    drain(memory_proxy)
    sdk = openai.OpenAI(base_url=memory_proxy.base_url, api_key="x", max_retries=0)
    with sdk.chat.completions.with_streaming_response.create(
        model="fake-model", stream=True, messages=[{"role": "user", "content": "What hotel did we pick for the offsite?"}],
        extra_headers={"X-User-ID": "alice", "X-Session-ID": "streamed"},
    ) as response:
        ids = response.headers.get("x-memory-ids", "").split(",")
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert ids and ids[0].startswith("mem_") and text.startswith("echo:")
    assert "Alfama Lighthouse" in memory_text(upstream.chat_requests[-1])


def test_the_memory_stage_is_skipped_cheaply_when_the_tenant_has_no_memories(memory_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    _, headers = chat(memory_proxy, "hello there", user="carol", session="first-ever")
    assert "x-memory-ids" not in headers
    assert upstream.chat_requests[-1]["messages"] == [{"role": "user", "content": "hello there"}]
    assert memory_stats(memory_proxy)["counters"].get("recalls", 0) == 0


def test_embedder_down_still_answers_from_keywords_and_says_so(tmp_path: Path, upstream: FakeUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: every embedding call fails
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "embedder": "emb"})
    tenant["models"]["emb"] = {"model": "openai/text-embedding-3-small", "api_base": dead, "api_key": "k"}
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        chat(proxy, HOTEL, user="alice", session="planning")
        drain(proxy)
        answer, headers = chat(proxy, "Which Lisbon hotel did we settle on for the offsite?", user="alice", session="later")
        assert answer.startswith("echo:")
        assert headers["x-memory-degraded"] == "embedder-unavailable"
        assert injected_ids(headers), "lexical retrieval alone must still find the memory"
        assert "Alfama Lighthouse" in memory_text(upstream.chat_requests[-1])
        stats = memory_stats(proxy)
        assert stats["embedder"]["ready"] is False and stats["embedder"]["error"]
        assert stats["counters"]["lexical_only"] >= 1 and stats["index"]["unembedded"] >= 1
        found = httpx.post(f"{proxy.url}/v1/memories/search", json={"query": "Lisbon hotel", "user_id": "alice"})
        assert found.status_code == 200 and found.json()["degraded"] == "embedder-unavailable"
        assert found.headers["X-Memory-Degraded"] == "embedder-unavailable" and found.json()["data"]


def test_a_failing_query_embedding_falls_back_to_keywords(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "embedder": "fake-embedding"})
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        wait_for_embedder(proxy)
        chat(proxy, HOTEL, user="alice", session="planning")
        drain(proxy)
        upstream.fail_next(503, "embedding service overloaded")  # taken by the query embedding
        answer, headers = chat(proxy, "Which Lisbon hotel did we settle on?", user="alice", session="later")
        assert answer.startswith("echo:") and headers["x-memory-degraded"] == "embedder-unavailable"
        assert injected_ids(headers)
        assert memory_stats(proxy)["counters"]["embedder_errors"] >= 1


def test_retrieval_over_budget_goes_on_without_memories_and_is_counted(tmp_path: Path) -> None:
    with FakeUpstream.run_in_thread(expected_api_key="upstream-secret-key", latency=0.3) as slow:
        tenant = open_tenant(slow.base_url, memory={"latency_budget_ms": 50, "embedder": "fake-embedding"})
        with running(write_config(tmp_path, {"local": tenant})) as proxy:
            wait_for_embedder(proxy)
            chat(proxy, HOTEL, user="alice", session="planning")
            drain(proxy)
            answer, headers = chat(proxy, "Which Lisbon hotel did we settle on?", user="alice", session="later")
            assert answer.startswith("echo:")
            assert headers["x-memory-status"] == "budget-exceeded" and injected_ids(headers) == []
            assert recalled_block(slow.chat_requests[-1]) == "" and system_prompt(slow.chat_requests[-1]) == ""
            assert memory_stats(proxy)["counters"]["budget_misses"] == 1


def test_procedural_memories_from_config_and_api_are_always_injected(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "procedural": ["Quote prices in euros."]})
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        added = httpx.post(f"{proxy.url}/v1/memories", json={"content": "Alice wants answers in bullet points.", "type": "procedural", "user_id": "alice"})
        assert added.status_code == 200
        _, headers = chat(proxy, "What is the weather like?", user="alice", session="s")
        prompt = memory_text(upstream.chat_requests[-1])
        assert "- Quote prices in euros." in prompt and "- Alice wants answers in bullet points." in prompt
        assert injected_ids(headers) == [added.json()["id"]]
        chat(proxy, "What is the weather like?", user="bob", session="t")
        prompt = memory_text(upstream.chat_requests[-1])
        assert "Quote prices in euros." in prompt and "bullet points" not in prompt


def test_stateless_and_disabled_tenants_skip_memory(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenants = {
        "plain": open_tenant(upstream.base_url, stateless=True),
        "off": open_tenant(upstream.base_url, memory={"enabled": False}, allow_unauthenticated=False, api_key_sha256=[__import__("proxy.config", fromlist=["hash_key"]).hash_key("off-key")]),
    }
    with running(write_config(tmp_path, tenants)) as proxy:
        _, headers = chat(proxy, HOTEL, user="alice", session="x")
        assert "x-memory-ids" not in headers
        assert memory_stats(proxy)["enabled"] is False
        response = httpx.get(f"{proxy.url}/v1/memories", headers={"Authorization": "Bearer off-key"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "memory_disabled"


def test_messages_recorded_while_memory_was_off_are_remembered_at_the_next_start(tmp_path: Path, upstream: FakeUpstream) -> None:
    off = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"enabled": False})})
    with running(off) as proxy:
        chat(proxy, HOTEL, user="alice", session="planning")
    on = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK})})
    with running(on) as proxy:
        drain(proxy)
        assert memory_stats(proxy)["index"]["episodic"] == 2
        _, headers = chat(proxy, "Which hotel did we pick for the Lisbon offsite?", user="alice", session="later")
        assert injected_ids(headers) and "Alfama Lighthouse" in memory_text(upstream.chat_requests[-1])
    with running(on) as proxy:  # caught up once: nothing indexed twice on the next start
        drain(proxy)
        assert memory_stats(proxy)["index"]["episodic"] == 4


def test_switching_the_local_engine_re_embeds_the_memories(tmp_path: Path, upstream: FakeUpstream) -> None:
    # local-exact (float32) and local (int8) vectors are different models' vectors: after a
    # switch, what was stored is re-embedded by the new engine, and recall goes on.
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "top_k": 3, "embedder": "local-exact"})
    question = "Which hotel did we pick for the offsite?"
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        assert memory_stats(proxy)["embedder"]["name"] == "local/all-MiniLM-L6-v2"
        chat(proxy, HOTEL, user="alice", session="planning")
        drain(proxy)
        _, headers = chat(proxy, question, user="alice", session="q1")
        before = injected_ids(headers)
        assert before and "x-memory-degraded" not in headers
    tenant["memory"]["embedder"] = "local"
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        stats = memory_stats(proxy)
        assert stats["embedder"]["name"] == "local/all-MiniLM-L6-v2-int8"
        assert stats["index"]["unembedded"] == 0 and stats["index"]["hnsw_entries"] == stats["index"]["memories"]
        store = proxy.app[keys.STORE]
        stored = [value for session in ("planning", "q1") for _, value in proxy.call(store.scan_records("local", "memory", session))]
        assert len(stored) == 4 and {value["model"] for value in stored} == {"local/all-MiniLM-L6-v2-int8"}
        _, headers = chat(proxy, question, user="alice", session="q2")
        assert "x-memory-degraded" not in headers
        assert before[0] in injected_ids(headers)


def test_the_query_embedding_starts_before_the_session_loads_and_is_not_repeated(memory_proxy: ProxyThread, upstream: FakeUpstream, monkeypatch) -> None:
    """The query embedding (the slowest step) starts as soon as the request is parsed; the recall
    then uses that one. A request that recalls nothing in the end (an idempotent replay) gives
    it up."""
    import openai

    from proxy.memory import recall as service_module

    chat(memory_proxy, HOTEL, user="alice", session="planning")
    drain(memory_proxy)
    wait_for_embedder(memory_proxy)
    pipeline = memory_proxy.app[keys.PIPELINE]
    memory = pipeline.memory
    events: list[str] = []
    start, load, cancel = memory.recaller.start_query_embedding, pipeline._load, service_module.QueryEmbedding.cancel

    def started(*args, **kwargs):
        events.append("embedding")
        return start(*args, **kwargs)

    async def loaded(*args, **kwargs):
        events.append("load")
        return await load(*args, **kwargs)

    def cancelled(self) -> None:
        events.append("cancelled")
        cancel(self)

    monkeypatch.setattr(memory.recaller, "start_query_embedding", started)
    monkeypatch.setattr(pipeline, "_load", loaded)
    monkeypatch.setattr(service_module.QueryEmbedding, "cancel", cancelled)
    _, headers = chat(memory_proxy, "Which hotel did we pick for the offsite?", user="alice", session="later")
    assert events == ["embedding", "load"]  # one embedding, before the session was loaded
    assert injected_ids(headers) and "x-memory-degraded" not in headers  # and the recall used its vector

    events.clear()
    sdk = openai.OpenAI(base_url=memory_proxy.base_url, api_key="local-key", max_retries=0)
    ask = {"model": "fake-model", "messages": [{"role": "user", "content": "And the offsite budget?"}],
           "extra_headers": {"X-User-ID": "alice", "X-Session-ID": "budget", "Idempotency-Key": "retry-1"}}
    first = sdk.chat.completions.with_raw_response.create(**ask)
    again = sdk.chat.completions.with_raw_response.create(**ask)
    assert again.headers.get("idempotent-replayed") == "true" and again.parse().id == first.parse().id
    assert events == ["embedding", "load", "embedding", "load", "cancelled"]  # the replay's is given up
