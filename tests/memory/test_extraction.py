"""Memory that learns, end to end through the real proxy: facts, preferences and lessons
extracted in the background (the fake upstream acting as the extractor model with scripted JSON
replies, or the rules), a contradicting fact superseding the older one, duplicates merged,
lessons recalled in a later session, bad extractor output retried, TTL expiry and erasure."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from proxy.memory import expiry
from proxy.memory.extract_rules import Candidate
from proxy.memory.model import SEMANTIC
from proxy.memory.service import MemoryService
from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant, write_config
from tests.memory_helpers import (SLOW_OK, Extractor, chat, drain, injected_ids, known_ids, memory_text, quiet, recalled_block, running,
                                  system_prompt)


def _service(proxy: ProxyThread) -> MemoryService:
    assert proxy.app is not None
    service = proxy.app[keys.PIPELINE].memory
    assert service is not None
    return service


def _start(tmp_path: Path, upstream: FakeUpstream, **memory: Any) -> Any:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "top_k": 5} | memory)
    return running(write_config(tmp_path, {"local": tenant}))


def _audit(proxy: ProxyThread, **query: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/admin/memory/extractions", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def _live(proxy: ProxyThread, user: str) -> list[dict[str, Any]]:
    return _audit(proxy, user_id=user)["memories"]


@pytest.fixture
def model_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    with _start(tmp_path, upstream, extractor_model="extractor") as proxy:
        quiet(proxy)
        yield proxy


@pytest.fixture
def rules_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    with _start(tmp_path, upstream, extract=True) as proxy:
        quiet(proxy)
        yield proxy


def test_the_extractor_model_turns_turns_into_memories_with_provenance(model_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    extractor = Extractor(upstream)
    extractor.replies.append({"memories": [
        {"type": "semantic", "kind": "fact", "text": "The user lives in Lisbon.", "subject": "user.home_city", "seqs": [0]},
        {"type": "procedural", "kind": "preference", "text": "The user wants prices in euros.", "seqs": [0]},
        {"type": "bogus", "text": ""},  # a malformed item is dropped, the rest kept
    ]})
    chat(model_proxy, "I moved to Lisbon last month. Please always quote prices in euros.", user="alice", session="s1")
    assert not extractor.calls  # never on the request path
    drain(model_proxy)

    assert len(extractor.calls) == 1
    call = extractor.calls[0]
    assert call["model"] == "extractor" and "[0] user: I moved to Lisbon" in call["messages"][1]["content"]
    live = {m["content"]: m for m in _live(model_proxy, "alice")}
    assert set(live) == {"The user lives in Lisbon.", "The user wants prices in euros."}
    fact = live["The user lives in Lisbon."]
    assert fact["type"] == "semantic" and fact["session_id"] == "s1" and fact["user_id"] == "alice"
    assert fact["extracted"]["by"] == "extractor" and fact["extracted"]["subject"] == "user.home_city"
    assert [(s["session"], s["seqs"]) for s in fact["extracted"]["sources"]] == [("s1", [0])]
    assert live["The user wants prices in euros."]["type"] == "procedural"

    view = _audit(model_proxy, session_id="s1")
    (run,) = view["extraction_runs"]
    assert run["by"] == "extractor" and run["seqs"] == [0, 1] and sorted(run["added"]) == sorted(m["id"] for m in live.values())
    assert {m["status"] for m in view["memories"]} == {"live"}

    # The next turn of the session is extracted from the new messages only (the mark).
    chat(model_proxy, "Thanks, that is all for today.", user="alice", session="s1")
    drain(model_proxy)
    assert "[2] user: Thanks" in extractor.calls[1]["messages"][1]["content"]
    assert "[0] user: I moved" in extractor.calls[1]["messages"][1]["content"]  # as context only
    assert known_ids(extractor.calls[1]) and set(known_ids(extractor.calls[1])) == {m["id"] for m in live.values()}
    assert len(_audit(model_proxy, session_id="s1")["extraction_runs"]) == 2


def test_a_contradicting_fact_supersedes_the_older_one(model_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    extractor = Extractor(upstream)
    extractor.replies.append({"memories": [{"kind": "fact", "text": "The user lives in Lisbon.", "subject": "user.home_city"}]})
    chat(model_proxy, "I live in Lisbon.", user="alice", session="s1")
    drain(model_proxy)
    (old,) = _live(model_proxy, "alice")

    # The model names the memory it replaces by the id it was shown.
    extractor.replies.append(lambda body: {"memories": [{"kind": "fact", "text": "The user lives in Porto now.",
                                                          "replaces": known_ids(body)[0]}]})
    chat(model_proxy, "I have moved to Porto since.", user="alice", session="s2")
    drain(model_proxy)
    (new,) = _live(model_proxy, "alice")
    assert new["content"] == "The user lives in Porto now." and new["extracted"]["supersedes"] == [old["id"]]
    assert new["extracted"]["subject"] == "user.home_city"  # inherited from the memory it replaced
    assert httpx.get(f"{model_proxy.url}/v1/memories/{old['id']}").status_code == 404  # no longer recalled...
    (audit,) = _audit(model_proxy, user_id="alice")["superseded"]  # ...but kept for audit
    assert audit["id"] == old["id"] and audit["superseded_by"] == new["id"] and audit["valid_to"] >= audit["created_at"]
    assert audit["content"] == "The user lives in Lisbon."

    # The same subject again, without naming the id: the subject record decides.
    extractor.replies.append({"memories": [{"kind": "fact", "text": "The user lives in Faro.", "subject": "User.Home City"}]})
    chat(model_proxy, "We relocated to Faro.", user="alice", session="s3")
    drain(model_proxy)
    (latest,) = _live(model_proxy, "alice")
    assert latest["content"] == "The user lives in Faro." and latest["extracted"]["supersedes"] == [new["id"]]

    _, headers = chat(model_proxy, "Which city does the user live in these days?", user="alice", session="q")
    block = recalled_block(upstream.chat_requests[-1])
    assert "The user lives in Faro." in block and "Porto now" not in block and "The user lives in Lisbon." not in block


def test_duplicates_merge_into_one_memory(model_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    extractor = Extractor(upstream)
    extractor.replies += [{"memories": [{"kind": "fact", "text": "The user is allergic to peanuts."}]},
                          {"memories": [{"kind": "fact", "text": "the user is  allergic to peanuts."}]},  # same text, normalised
                          {"memories": [{"kind": "fact", "text": "The user is allergic to peanuts!"}]}]  # a near-duplicate
    for session in ("s1", "s2", "s3"):
        chat(model_proxy, "Remember that I am allergic to peanuts.", user="alice", session=session)
        drain(model_proxy)
    (memory,) = _live(model_proxy, "alice")
    assert [s["session"] for s in memory["extracted"]["sources"]] == ["s1", "s2", "s3"]
    runs = [_audit(model_proxy, session_id=s)["extraction_runs"][0] for s in ("s1", "s2", "s3")]
    assert runs[0]["added"] == [memory["id"]] and runs[1]["merged"] == [memory["id"]] and runs[2]["merged"] == [memory["id"]]

    # Two concurrent adds of the same new fact: one memory.
    service = _service(model_proxy)
    session = model_proxy.call(service.store.get_session("local", "s1"))
    fact = "The user's daughter is called Ines."

    async def twice() -> list[Any]:
        return await asyncio.gather(*[service.learning.extractor.consolidator.apply(
            "local", "alice", "s1", session.created_at, "extractor", [Candidate(fact, SEMANTIC, "fact", [0])]) for _ in range(2)])

    outcomes = model_proxy.call(twice())
    assert sorted(len(o.added) for o in outcomes) == [0, 1] and sorted(len(o.merged) for o in outcomes) == [0, 1]
    assert sum(1 for m in _live(model_proxy, "alice") if m["content"] == fact) == 1
    listed = httpx.get(f"{model_proxy.url}/v1/memories", params={"user_id": "alice", "type": "semantic"}).json()["data"]
    assert sum(1 for m in listed if m["content"] == fact) == 1


def test_bad_extractor_output_is_retried_with_backoff_then_the_rules_stand_in(model_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    extractor = Extractor(upstream)
    extractor.replies += ["Sure! Here are the memories you asked for.", {"facts": ["wrong shape"]}, "[not json"]
    chat(model_proxy, "My email is alice@example.com.", user="alice", session="s1")
    drain(model_proxy)
    assert len(extractor.calls) == 3  # three attempts, then the rules
    (memory,) = _live(model_proxy, "alice")
    assert memory["content"] == "My email is alice@example.com." and memory["extracted"]["by"] == "rules"
    (run,) = _audit(model_proxy, session_id="s1")["extraction_runs"]
    assert run["by"] == "rules" and run["attempts"] == 3 and "BadReply" in run["error"]
    counters = httpx.get(f"{model_proxy.url}/admin/memory").json()["counters"]
    assert counters["extract_failures"] == 3

    # An upstream error, then a good reply: retried, the model's memory kept.
    extractor.replies.append({"memories": [{"kind": "fact", "text": "The user works at Acme."}]})
    chat(model_proxy, "I work at Acme.", user="alice", session="s2")
    upstream.fail_next(503)  # the extractor's first call
    drain(model_proxy)
    (run,) = _audit(model_proxy, session_id="s2")["extraction_runs"]
    assert run["by"] == "extractor" and run["attempts"] == 2 and run["error"] is None
    assert "The user works at Acme." in {m["content"] for m in _live(model_proxy, "alice")}
    # The proxy kept serving throughout.
    assert chat(model_proxy, "hello again", user="alice", session="s3")[0].startswith("echo:")


def test_rules_extract_facts_and_a_newer_one_supersedes(rules_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    chat(rules_proxy, "Hi there. My email is alice@old.example. I prefer short answers.", user="alice", session="s1")
    drain(rules_proxy)
    live = {m["content"]: m for m in _live(rules_proxy, "alice")}
    assert set(live) == {"My email is alice@old.example.", "I prefer short answers."}  # not the greeting
    assert live["My email is alice@old.example."]["extracted"]["subject"] == "user.email"
    assert all(m["type"] == "semantic" and m["extracted"]["by"] == "rules" for m in live.values())

    chat(rules_proxy, "By the way, my email is alice@new.example now.", user="alice", session="s2")
    drain(rules_proxy)
    now = {m["content"]: m for m in _live(rules_proxy, "alice")}
    assert set(now) == {"By the way, my email is alice@new.example now.", "I prefer short answers."}
    assert now["By the way, my email is alice@new.example now."]["extracted"]["supersedes"] == [live["My email is alice@old.example."]["id"]]
    assert [a["content"] for a in _audit(rules_proxy, user_id="alice")["superseded"]] == ["My email is alice@old.example."]
    assert _live(rules_proxy, "bob") == []  # another user's facts are theirs only


def _deploy_history() -> list[dict[str, Any]]:
    def call(call_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "deploy_service", "arguments": json.dumps(arguments)}}]}

    return [
        {"role": "user", "content": "Ship the billing service to production."},
        call("c1", {"service": "billing", "env": "production"}),
        {"role": "tool", "tool_call_id": "c1", "content": "Error: permission denied for env production without approval_ticket"},
        call("c2", {"service": "billing", "env": "production", "approval_ticket": "CHG-1"}),
        {"role": "tool", "tool_call_id": "c2", "content": "deployed billing v42"},
    ]


def test_a_lesson_from_a_failed_then_fixed_tool_call_is_recalled_in_a_later_session(rules_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk = openai.OpenAI(base_url=rules_proxy.base_url, api_key="x", max_retries=0)
    sdk.chat.completions.create(model="fake-model", messages=_deploy_history() + [{"role": "user", "content": "Done, thanks."}],
                                extra_headers={"X-User-ID": "alice", "X-Session-ID": "ops-1"})
    drain(rules_proxy)
    (lesson,) = [m for m in _live(rules_proxy, "alice") if m["type"] == "procedural"]
    assert lesson["content"].startswith("When deploy_service(") and "permission denied" in lesson["content"]
    assert "approval_ticket" in lesson["content"] and lesson["extracted"]["sources"][0]["seqs"] == [1, 2, 3, 4]

    _, headers = chat(rules_proxy, "Deploy the search service to production please.", user="alice", session="ops-2")
    assert lesson["id"] in injected_ids(headers)
    request = upstream.chat_requests[-1]
    assert lesson["content"] in recalled_block(request)  # before the newest user message, cache-friendly
    assert lesson["content"] not in system_prompt(request)
    view = _audit(rules_proxy, session_id="ops-2")
    assert any(lesson["id"] in entry["memory_ids"] for entry in view["injected"])

    _, headers = chat(rules_proxy, "Deploy the search service to production please.", user="bob", session="ops-3")
    assert lesson["id"] not in injected_ids(headers)
    assert "approval_ticket" not in memory_text(upstream.chat_requests[-1])


def test_expired_memories_are_not_recalled_and_are_swept(tmp_path: Path, upstream: FakeUpstream) -> None:
    with _start(tmp_path, upstream, extract=True, ttl={"semantic": 2 / 86400, "procedural": None}) as proxy:
        service = quiet(proxy)
        chat(proxy, "Hello again! My favourite color is teal.", user="alice", session="s1")
        drain(proxy)
        (memory,) = _live(proxy, "alice")
        _, headers = chat(proxy, "What is my favourite color?", user="alice", session="q1")
        assert memory["id"] in injected_ids(headers)
        time.sleep(2.2)
        _, headers = chat(proxy, "What is my favourite color?", user="alice", session="q2")
        assert memory["id"] not in injected_ids(headers)
        assert proxy.call(service.learning.sweep()) >= 1
        assert httpx.get(f"{proxy.url}/v1/memories/{memory['id']}").status_code == 404
        assert proxy.call(expiry.sweep(service.tenants["local"], service.store)) == 0


def test_erasing_a_session_or_a_user_erases_what_was_extracted_from_it(rules_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    chat(rules_proxy, "My email is alice@old.example.", user="alice", session="s1")
    drain(rules_proxy)
    chat(rules_proxy, "My email is alice@new.example.", user="alice", session="s2")
    chat(rules_proxy, "I live in Berlin.", user="alice", session="s3")
    chat(rules_proxy, "I live in Madrid.", user="bob", session="b1")
    drain(rules_proxy)
    assert len(_live(rules_proxy, "alice")) == 2 and len(_audit(rules_proxy, user_id="alice")["superseded"]) == 1

    assert httpx.delete(f"{rules_proxy.url}/admin/sessions/s2").status_code == 200
    assert [m["content"] for m in _live(rules_proxy, "alice")] == ["I live in Berlin."]
    assert _audit(rules_proxy, session_id="s2")["extraction_runs"] == []

    erased = httpx.delete(f"{rules_proxy.url}/admin/memory/users/alice")
    assert erased.status_code == 200 and erased.json()["memories_erased"] >= 2  # episodic ones included
    assert _live(rules_proxy, "alice") == [] and _audit(rules_proxy, user_id="alice")["superseded"] == []
    assert httpx.get(f"{rules_proxy.url}/v1/memories", params={"user_id": "alice"}).json()["data"] == []
    assert [m["content"] for m in _live(rules_proxy, "bob")] == ["I live in Madrid."]
    _, headers = chat(rules_proxy, "Where do I live, and what is my email?", user="alice", session="later")
    assert "Berlin" not in memory_text(upstream.chat_requests[-1]) and "alice@" not in memory_text(upstream.chat_requests[-1])


def test_the_audit_api_checks_its_arguments(rules_proxy: ProxyThread) -> None:
    both = httpx.get(f"{rules_proxy.url}/admin/memory/extractions", params={"user_id": "a", "session_id": "b"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "session_id"
    assert httpx.get(f"{rules_proxy.url}/admin/memory/extractions").status_code == 400


def test_after_a_restart_the_store_still_merges_supersedes_and_recalls_lessons_by_relevance(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "extract": True})
    path = write_config(tmp_path, {"local": tenant})
    with running(path) as proxy:
        quiet(proxy)
        chat(proxy, "Note: my email is alice@old.example. I am allergic to peanuts.", user="alice", session="s1")
        drain(proxy)
        before = {m["content"]: m["id"] for m in _live(proxy, "alice")}
    assert set(before) == {"Note: my email is alice@old.example.", "I am allergic to peanuts."}
    with running(path) as proxy:  # nothing of the first process's state but what LMDB holds
        quiet(proxy)
        chat(proxy, "Reminder: I am allergic to peanuts. My email is alice@new.example.", user="alice", session="s2")
        drain(proxy)
        after = {m["content"]: m for m in _live(proxy, "alice")}
        assert set(after) == {"I am allergic to peanuts.", "My email is alice@new.example."}
        assert after["I am allergic to peanuts."]["id"] == before["I am allergic to peanuts."]  # merged, not stored twice
        assert [s["session"] for s in after["I am allergic to peanuts."]["extracted"]["sources"]] == ["s1", "s2"]
        assert after["My email is alice@new.example."]["extracted"]["supersedes"] == [before["Note: my email is alice@old.example."]]
        assert len(_audit(proxy, session_id="s1")["extraction_runs"]) == 1  # the mark survived: s1 was not extracted again


def test_a_rollback_takes_back_what_was_extracted_from_the_reverted_turns(rules_proxy: ProxyThread) -> None:
    answer, _ = chat(rules_proxy, "I live in Berlin.", user="alice", session="trip")
    history = [{"role": "user", "content": "I live in Berlin."}, {"role": "assistant", "content": answer}]
    chat(rules_proxy, "My email is alice@example.com.", user="alice", session="trip", history=history)
    drain(rules_proxy)
    assert {m["content"] for m in _live(rules_proxy, "alice")} == {"I live in Berlin.", "My email is alice@example.com."}
    rolled = httpx.post(f"{rules_proxy.url}/admin/sessions/trip/rollback", json={"turns": 1})
    assert rolled.status_code == 200, rolled.text
    assert [m["content"] for m in _live(rules_proxy, "alice")] == ["I live in Berlin."]


def test_without_a_user_id_a_session_learns_for_itself_only(rules_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    chat(rules_proxy, "Hello. My email is anna@example.com.", session="anon-a")
    chat(rules_proxy, "Hello. My email is bert@example.com.", session="anon-b")
    drain(rules_proxy)
    a, b = (_audit(rules_proxy, session_id=s)["memories"] for s in ("anon-a", "anon-b"))
    assert [(m["content"], m["status"], m["user_id"]) for m in a] == [("My email is anna@example.com.", "live", None)]
    assert [(m["content"], m["status"]) for m in b] == [("My email is bert@example.com.", "live")]  # no supersession across sessions
    chat(rules_proxy, "Hello. My email is anna@example.com.", session="anon-b")
    drain(rules_proxy)
    runs = _audit(rules_proxy, session_id="anon-b")["extraction_runs"]
    assert runs[-1]["added"] and runs[-1]["merged"] == []  # not merged into anon-a's memory
    chat(rules_proxy, "What is my email address?", session="anon-a")
    assert "bert@" not in memory_text(upstream.chat_requests[-1])


def test_an_extractor_cannot_supersede_another_users_memory(model_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    extractor = Extractor(upstream)
    extractor.replies.append({"memories": [{"kind": "fact", "text": "The user's PIN hint is a cat.", "subject": "user.pin_hint"}]})
    chat(model_proxy, "My PIN hint is my cat.", user="alice", session="a1")
    drain(model_proxy)
    (alice,) = _live(model_proxy, "alice")
    # Bob's extraction names Alice's memory (by id and by her subject): neither reaches it.
    extractor.replies.append({"memories": [{"kind": "fact", "text": "Bob's PIN hint is a dog.", "replaces": alice["id"]},
                                           {"kind": "fact", "text": "Bob likes dogs.", "subject": "user.pin_hint"}]})
    chat(model_proxy, "My PIN hint is my dog.", user="bob", session="b1")
    drain(model_proxy)
    assert [m["id"] for m in _live(model_proxy, "alice")] == [alice["id"]]
    assert _audit(model_proxy, user_id="alice")["superseded"] == []
    assert {m["content"] for m in _live(model_proxy, "bob")} == {"Bob's PIN hint is a dog.", "Bob likes dogs."}
    assert alice["id"] not in known_ids(extractor.calls[-1])  # never shown another user's memories


def test_extraction_respects_the_memory_quota(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, quotas={"memories": 1},
                         memory={"latency_budget_ms": SLOW_OK, "extract": True, "episodic": False})
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        quiet(proxy)
        chat(proxy, "My email is a@old.example. I am allergic to peanuts.", user="alice", session="s1")
        drain(proxy)
        (kept,) = _live(proxy, "alice")
        (run,) = _audit(proxy, session_id="s1")["extraction_runs"]
        assert run["over_quota"] == 1 and run["added"] == [kept["id"]]
        chat(proxy, "My email is a@new.example.", user="alice", session="s2")  # superseding adds nothing: allowed
        drain(proxy)
        assert [m["content"] for m in _live(proxy, "alice")] == ["My email is a@new.example."]


def test_turns_recorded_but_not_extracted_before_a_stop_are_extracted_after_the_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = write_config(tmp_path, {"local": open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK, "extract": True})})
    with running(path) as proxy:
        service = quiet(proxy)
        answer, _ = chat(proxy, "My email is alice@example.com.", user="alice", session="s1")
        drain(proxy)
        history = [{"role": "user", "content": "My email is alice@example.com."}, {"role": "assistant", "content": answer}]
        chat(proxy, "I am allergic to peanuts.", user="alice", session="s1", history=history)

        async def crash() -> None:  # the process stops before the scheduled run
            service.learning.extractor._pending.clear()

        proxy.call(crash())
    with running(path) as proxy:
        quiet(proxy)
        async def caught_up() -> None:  # the start-up catch-up has scheduled s1
            task = _service(proxy).learning.extractor._catch_up
            assert task is not None
            await task

        proxy.call(caught_up())
        drain(proxy)
        assert {m["content"] for m in _live(proxy, "alice")} == {"My email is alice@example.com.", "I am allergic to peanuts."}
        assert [r["seqs"] for r in _audit(proxy, session_id="s1")["extraction_runs"]] == [[0, 1], [2, 3]]


def test_an_extractor_that_never_answers_is_retried_then_the_rules_stand_in(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url, upstream_timeout_seconds=1,
                         memory={"latency_budget_ms": SLOW_OK, "extractor_model": "extractor"})
    with running(write_config(tmp_path, {"local": tenant})) as proxy:
        quiet(proxy, attempts=2)
        chat(proxy, "My email is alice@example.com.", user="alice", session="s1")
        upstream.hang_next(2)  # both extractor calls
        drain(proxy)
        (run,) = _audit(proxy, session_id="s1")["extraction_runs"]
        assert run["by"] == "rules" and run["attempts"] == 2
        # The run says what happened (the upstream client's timeout or the worker's, whichever fires first),
        # never a bare "TimeoutError: " as the worker's said against the real model.
        assert "no reply within 1 s" in run["error"] or "timed out after 1s" in run["error"], run["error"]
        assert [m["content"] for m in _live(proxy, "alice")] == ["My email is alice@example.com."]
