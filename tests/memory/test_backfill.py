"""Backfill through the real proxy: sessions recorded while extraction was off are extracted
once it is on (at a restart, or after a reload turns it on), oldest first, once each (a restart
half way resumes without repeating a turn), never from a session or user erased meanwhile, and
never in the way of a request."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from proxy.config import load_config
from proxy.memory import extract_llm
from proxy.memory.service import MemoryService
from proxy.server import keys
from proxy.server.reload import Reloader
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, open_tenant, route, write_config
from tests.memory_helpers import SLOW_OK, chat, drain, injected_ids, memory_text, running

FAST = 6000  # backfill_per_minute for tests that wait for the whole backfill


def _config(tmp_path: Path, upstream: FakeUpstream, extractor: FakeUpstream | dict[str, Any] | None = None, **memory: Any) -> Path:
    """The config file; ``extractor``: the fake upstream of the "extractor" alias, or other tenant keys."""
    extra = extractor if isinstance(extractor, dict) else {}
    tenant = open_tenant(upstream.base_url, memory={"latency_budget_ms": SLOW_OK} | memory, **extra)
    extractor = extractor if isinstance(extractor, FakeUpstream) else None
    if extractor is not None:
        tenant["models"] = {"*": route(upstream.base_url), "extractor": route(extractor.base_url, "openai/extractor")}
    return write_config(tmp_path, {"local": tenant})


def _service(proxy: ProxyThread) -> MemoryService:
    assert proxy.app is not None and proxy.app[keys.PIPELINE].memory is not None
    return proxy.app[keys.PIPELINE].memory


def _settled(proxy: ProxyThread) -> None:
    """Wait until the backfill is over, then until what it queued is indexed."""
    drain(proxy)
    proxy.call(_service(proxy).learning.backfill.drain(), timeout=60)
    drain(proxy)


def _history(proxy: ProxyThread) -> None:
    """Three sessions of alice (the oldest first) and one of bob, recorded with extraction off."""
    chat(proxy, "Hello! My email is alice@old.example.", user="alice", session="s1")
    answer, _ = chat(proxy, "I am allergic to peanuts.", user="alice", session="s2")
    chat(proxy, "Also, I live in Berlin.", user="alice", session="s2",
         history=[{"role": "user", "content": "I am allergic to peanuts."}, {"role": "assistant", "content": answer}])
    chat(proxy, "By the way, my email is alice@new.example now.", user="alice", session="s3")
    chat(proxy, "I work at Initech.", user="bob", session="b1")


def _audit(proxy: ProxyThread, **query: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/admin/memory/extractions", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def _live(proxy: ProxyThread, user: str) -> dict[str, dict[str, Any]]:
    return {m["content"]: m for m in _audit(proxy, user_id=user)["memories"]}


def _backfill(proxy: ProxyThread) -> dict[str, Any]:
    return httpx.get(f"{proxy.url}/admin/memory").json()["backfill"]


class Scripted:
    """A fake upstream as the extractor model: one fact per session, in the words of its turns,
    every call recorded; ``during`` runs inside a call (the backfill is then mid-run)."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.calls: list[dict[str, Any]] = []
        self.during: Callable[[dict[str, Any]], None] | None = None
        fake.responder = self._respond

    def _respond(self, body: dict[str, Any]) -> str | None:
        assert body["messages"][0].get("content") == extract_llm.PROMPT
        self.calls.append(body)
        if self.during is not None:
            self.during(body)
        lines = re.findall(r"^\[(\d+)\] user: (.+)$", body["messages"][1]["content"], flags=re.M)
        return json.dumps({"memories": [{"kind": "fact", "text": f"Stated: {text}", "seqs": [int(seq)]} for seq, text in lines]})

    def turns_read(self) -> list[str]:
        """Every user turn the extractor was asked about, as text (repeats would show twice)."""
        return [text for body in self.calls for text in re.findall(r"^\[\d+\] user: (.+)$", body["messages"][1]["content"], flags=re.M)]


@pytest.fixture
def extractor() -> Iterator[FakeUpstream]:
    with FakeUpstream.run_in_thread() as fake:
        yield fake


def test_history_recorded_with_extraction_off_is_extracted_by_rules_after_a_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Without episodic memory, what a request recalls of the old turns is what was extracted.
    with running(_config(tmp_path, upstream, episodic=False)) as proxy:
        _history(proxy)
        drain(proxy)
        assert _live(proxy, "alice") == {} and _backfill(proxy) is None  # extraction off: nothing learned
    with running(_config(tmp_path, upstream, episodic=False, extract=True, backfill_per_minute=FAST)) as proxy:
        _settled(proxy)
        alice = _live(proxy, "alice")
        # Oldest first: the newer email supersedes the older one, not the other way round.
        assert set(alice) == {"By the way, my email is alice@new.example now.", "I am allergic to peanuts.", "Also, I live in Berlin."}
        email = alice["By the way, my email is alice@new.example now."]
        assert [(s["session"], s["seqs"]) for s in email["extracted"]["sources"]] == [("s3", [0])]
        assert email["extracted"]["by"] == "rules" and len(email["extracted"]["supersedes"]) == 1
        assert [a["content"] for a in _audit(proxy, user_id="alice")["superseded"]] == ["My email is alice@old.example."]
        assert [(s["session"], s["seqs"]) for s in alice["Also, I live in Berlin."]["extracted"]["sources"]] == [("s2", [2])]
        assert set(_live(proxy, "bob")) == {"I work at Initech."}
        assert [r["seqs"] for r in _audit(proxy, session_id="s2")["extraction_runs"]] == [[0, 1, 2, 3]]
        progress = _backfill(proxy)
        assert progress["state"] == "done" and progress["pending"] == 0 and progress["done"] == 4 and progress["runs"] == 4
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert 'asp_memory_backfill_sessions{state="done",tenant="local"} 4.0' in metrics
        # What was learned from the old turns is recalled in a new session of the user.
        _, headers = chat(proxy, "What is my email address?", user="alice", session="q")
        assert email["id"] in injected_ids(headers)
        assert "alice@old.example" not in memory_text(upstream.chat_requests[-1])
    with running(_config(tmp_path, upstream, extract=True, backfill_per_minute=FAST)) as proxy:
        _settled(proxy)  # every session has its mark: nothing is read again
        assert _backfill(proxy)["done"] == 0 and _backfill(proxy)["pending"] == 0
        assert len(_audit(proxy, session_id="s2")["extraction_runs"]) == 1


def test_the_extractor_model_backfills_with_provenance_and_a_restart_half_way_repeats_nothing(
        tmp_path: Path, upstream: FakeUpstream, extractor: FakeUpstream) -> None:
    scripted = Scripted(extractor)
    with running(_config(tmp_path, upstream, extractor)) as proxy:
        _history(proxy)
        drain(proxy)
    assert scripted.calls == []
    # One run, then the next waits 10 s (6 a minute): the proxy stops half way.
    with running(_config(tmp_path, upstream, extractor, extractor_model="extractor", backfill_per_minute=6)) as proxy:
        deadline = time.monotonic() + 30
        while not (_backfill(proxy) or {}).get("done"):
            assert time.monotonic() < deadline, "the first backfill run never finished"
            time.sleep(0.05)
        assert len(scripted.calls) == 1 and _backfill(proxy)["pending"] == 3
        first = _live(proxy, "alice")
        assert set(first) == {"Stated: Hello! My email is alice@old.example."}  # the oldest session first
    with running(_config(tmp_path, upstream, extractor, extractor_model="extractor", backfill_per_minute=FAST)) as proxy:
        _settled(proxy)
        assert _backfill(proxy)["done"] == 3 and len(scripted.calls) == 4
        read = scripted.turns_read()
        assert sorted(read) == sorted(set(read)) and len(read) == 5  # each recorded user turn asked about once
        alice = _live(proxy, "alice")
        assert len(alice) == 4 and alice["Stated: Hello! My email is alice@old.example."]["id"] == \
            first["Stated: Hello! My email is alice@old.example."]["id"]
        berlin = alice["Stated: Also, I live in Berlin."]
        assert berlin["extracted"]["by"] == "extractor"
        assert [(s["session"], s["seqs"]) for s in berlin["extracted"]["sources"]] == [("s2", [2])]
        for session in ("s1", "s2", "s3", "b1"):
            assert len(_audit(proxy, session_id=session)["extraction_runs"]) == 1


def test_a_reload_that_turns_extraction_on_starts_the_backfill(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = _config(tmp_path, upstream)
    with running(path) as proxy:
        _history(proxy)
        drain(proxy)
        assert _live(proxy, "alice") == {}
        _config(tmp_path, upstream, extract=True, backfill_per_minute=FAST)  # the tenant file, rewritten

        async def reload() -> bool:
            assert proxy.app is not None
            return Reloader(proxy.app, lambda: load_config(path)).reload("test")

        assert proxy.call(reload())
        _settled(proxy)
        assert "I am allergic to peanuts." in _live(proxy, "alice")
        assert _backfill(proxy)["done"] == 4
        # And extraction is on for new turns too.
        chat(proxy, "My favourite colour is teal.", user="alice", session="s4")
        drain(proxy)
        assert "My favourite colour is teal." in _live(proxy, "alice")


def test_a_session_or_a_user_erased_while_the_backfill_runs_gets_no_memories(
        tmp_path: Path, upstream: FakeUpstream, extractor: FakeUpstream) -> None:
    scripted = Scripted(extractor)
    with running(_config(tmp_path, upstream, extractor)) as proxy:
        _history(proxy)
        drain(proxy)
    with running(_config(tmp_path, upstream, extractor, extractor_model="extractor", backfill_per_minute=FAST)) as proxy:
        erased: list[str] = []

        def erase(body: dict[str, Any]) -> None:  # inside the extractor call: the run is half way
            if "alice@old.example" in body["messages"][1]["content"]:
                assert httpx.delete(f"{proxy.url}/admin/sessions/s1", timeout=30).status_code == 200
                erased.append("s1")
            elif "allergic" in body["messages"][1]["content"]:
                assert httpx.delete(f"{proxy.url}/admin/memory/users/alice", timeout=30).status_code == 200
                erased.append("alice")

        scripted.during = erase
        _settled(proxy)
        assert erased == ["s1", "alice"]
        assert _live(proxy, "alice") == {}  # nothing from the erased session, nor from the erased user's turns
        assert _audit(proxy, session_id="s1")["extraction_runs"] == []
        assert all(m["status"] != "live" for m in _audit(proxy, session_id="s2")["memories"])
        assert len(scripted.calls) == 3  # s1, s2 and bob's b1: s3's turns predate alice's erasure, no call
        assert set(_live(proxy, "bob")) == {"Stated: I work at Initech."}
        assert httpx.get(f"{proxy.url}/v1/memories", params={"user_id": "alice", "type": "semantic"}).json()["data"] == []
        # A turn alice sends after her erasure is learned from as usual.
        chat(proxy, "My favourite colour is teal.", user="alice", session="s5")
        _service(proxy).learning.extractor.delay = 0.0
        drain(proxy)
        assert set(_live(proxy, "alice")) == {"Stated: My favourite colour is teal."}


def test_a_request_answers_while_a_backfill_run_waits_on_the_extractor(
        tmp_path: Path, upstream: FakeUpstream, extractor: FakeUpstream) -> None:
    scripted = Scripted(extractor)
    with running(_config(tmp_path, upstream, extractor)) as proxy:
        _history(proxy)
        drain(proxy)
    release, calling = threading.Event(), threading.Event()

    def hold(body: dict[str, Any]) -> None:
        calling.set()
        assert release.wait(60)

    scripted.during = hold
    with running(_config(tmp_path, upstream, extractor, extractor_model="extractor", backfill_per_minute=FAST)) as proxy:
        try:
            assert calling.wait(30), "the backfill never called the extractor"
            # The session being backfilled, and another: both answer while the run is held.
            assert chat(proxy, "Are you there?", user="alice", session="s1")[0].startswith("echo:")
            assert chat(proxy, "And now?", user="carol", session="c1")[0].startswith("echo:")
            assert _backfill(proxy)["state"] == "running" and len(scripted.calls) == 1
        finally:
            release.set()
        _settled(proxy)
        assert _backfill(proxy)["state"] == "done"
        assert "Stated: Hello! My email is alice@old.example." in _live(proxy, "alice")


def test_a_long_session_is_backfilled_run_after_run_to_its_end(tmp_path: Path, upstream: FakeUpstream) -> None:
    history = []
    for i in range(125):
        history += [{"role": "user", "content": f"Line {i}: I decided to use tool number {i} for the job."},
                    {"role": "assistant", "content": f"Noted {i}."}]
    with running(_config(tmp_path, upstream, episodic=False)) as proxy:
        chat(proxy, "That is all.", user="alice", session="long", history=history)
    with running(_config(tmp_path, upstream, episodic=False, extract=True, backfill_per_minute=FAST)) as proxy:
        _settled(proxy)
        runs = _audit(proxy, session_id="long")["extraction_runs"]
        assert [(r["seqs"][0], r["seqs"][-1]) for r in runs] == [(0, 199), (200, 251)]  # 200 messages a run at most
        assert _backfill(proxy)["done"] == 1 and _backfill(proxy)["runs"] == 2
        # (near-identical lines merge into a few memories; the last line's turn is among their sources)
        assert any(248 in source["seqs"] for m in _live(proxy, "alice").values() for source in m["extracted"]["sources"])


def test_expired_sessions_are_not_backfilled(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running(_config(tmp_path, upstream)) as proxy:
        _history(proxy)
    time.sleep(1.2)
    with running(_config(tmp_path, upstream, {"session_ttl_seconds": 1}, extract=True, backfill_per_minute=FAST)) as proxy:
        _settled(proxy)  # (the janitor may delete them first: either way nothing is learned from them)
        assert _live(proxy, "alice") == {} and _live(proxy, "bob") == {}
        assert _backfill(proxy)["done"] == 0


def test_an_old_session_backfilled_after_a_newer_fact_was_learned_does_not_supersede_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = _config(tmp_path, upstream, episodic=False)
    with running(path) as proxy:
        chat(proxy, "My email is alice@old.example.", user="alice", session="old")
    # Extraction on, backfill off: only the new turn is learned.
    with running(_config(tmp_path, upstream, episodic=False, extract=True, backfill_per_minute=0)) as proxy:
        chat(proxy, "My email is alice@new.example.", user="alice", session="new")
        _service(proxy).learning.extractor.delay = 0.0
        drain(proxy)
        (new,) = _live(proxy, "alice").values()
        assert new["content"] == "My email is alice@new.example." and _backfill(proxy) is None
        # A reload turns the backfill on: the older statement arrives after the newer one.
        _config(tmp_path, upstream, episodic=False, extract=True, backfill_per_minute=FAST)

        async def reload() -> bool:
            assert proxy.app is not None
            return Reloader(proxy.app, lambda: load_config(path)).reload("test")

        assert proxy.call(reload())
        _settled(proxy)
        assert _backfill(proxy)["done"] == 1
        (run,) = _audit(proxy, session_id="old")["extraction_runs"]
        assert run["outdated"] == 1 and run["added"] == [] and run["superseded"] == []
        assert [m["id"] for m in _live(proxy, "alice").values()] == [new["id"]]  # the later statement stays current
        assert _audit(proxy, user_id="alice")["superseded"] == []
