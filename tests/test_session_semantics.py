"""Session semantics for agents that keep their own history: resume without a session id,
rollbacks and forks that stick, named checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import REPO, ProxyThread, local_config, local_proxy, start_thread

AGENT = """
import json, sys
from openai import OpenAI
base_url, system, history, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
client = OpenAI(base_url=base_url, api_key="agent-key", max_retries=0)
messages = [{"role": "system", "content": system}] + history + [{"role": "user", "content": new}]
raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=messages)
reply = raw.parse().choices[0].message.content
print(json.dumps({"reply": reply, "headers": {k.lower(): v for k, v in raw.headers.items()}}))
"""


def agent_turn(proxy: ProxyThread, system: str, history: list[dict], new: str) -> dict:
    """One run of an agent process: it sends its system prompt, what it remembers, and a new
    message, with no session id, the way an agent that only changed its base URL does."""
    done = subprocess.run([sys.executable, "-c", AGENT, proxy.base_url, system, json.dumps(history), new],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def converse(proxy: ProxyThread, system: str, turns: list[str]) -> tuple[list[dict], str]:
    """The agent's history after ``turns``, and the session the proxy put it in."""
    history: list[dict] = []
    for text in turns:
        answer = agent_turn(proxy, system, history, text)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer["reply"]}]
    return history, answer["headers"]["x-session-id"]


def sent_contents(upstream: FakeUpstream) -> list[str]:
    return [m["content"] for m in upstream.chat_requests[-1]["messages"]]


@pytest.mark.parametrize("implicit", ["resume", "new"])
def test_a_restarted_agent_resumes_its_session_only_when_the_tenant_chose_it(tmp_path: Path, upstream: FakeUpstream, implicit: str) -> None:
    path = local_config(tmp_path, upstream.base_url, memory={"enabled": False}, sessions={"implicit": implicit})
    with start_thread(path) as proxy:
        converse(proxy, "You are the build agent.", ["first", "second", "third"])
        restarted = agent_turn(proxy, "You are the build agent.", [], "where were we?")  # lost its history
    if implicit == "resume":
        assert sent_contents(upstream) == ["You are the build agent.", "first", "echo: first", "second", "echo: second",
                                           "third", "echo: third", "where were we?"]
        assert restarted["headers"]["x-session-source"] == "resumed" and int(restarted["headers"]["x-history-restored"]) >= 6
    else:
        assert sent_contents(upstream) == ["You are the build agent.", "where were we?"]
        assert restarted["headers"]["x-session-source"] == "implicit"


def test_two_agents_of_one_tenant_never_resume_each_other(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = local_config(tmp_path, upstream.base_url, memory={"enabled": False}, sessions={"implicit": "resume"})
    with start_thread(path) as proxy:
        converse(proxy, "You are the build agent.", ["build it"])
        converse(proxy, "You are the review agent.", ["review it"])
        agent_turn(proxy, "You are the review agent.", [], "and now?")
        assert sent_contents(upstream) == ["You are the review agent.", "review it", "echo: review it", "and now?"]
        agent_turn(proxy, "You are the build agent.", [], "and now?")
        assert sent_contents(upstream) == ["You are the build agent.", "build it", "echo: build it", "and now?"]
        sessions = httpx.get(proxy.url + "/admin/sessions").json()["data"]
    assert len(sessions) == 2


def test_a_rollback_sticks_when_the_agent_resends_its_stale_history(tmp_path: Path, upstream: FakeUpstream) -> None:
    with local_proxy(tmp_path, upstream.base_url, memory={"enabled": False}) as proxy:
        history, _ = converse(proxy, "sys", ["one", "two", "three"])
        session = agent_turn(proxy, "sys", history[:-2], "three")["headers"]["x-session-id"]  # a regeneration: one branch
        before = httpx.get(f"{proxy.url}/admin/sessions/{session}").json()["session"]["branches"]
        report = httpx.post(f"{proxy.url}/admin/sessions/{session}/rollback", json={"turns": 2}).json()
        assert len(report["reverted"]) == 5  # 4 on the path, and the first answer's branch off it
        answer = agent_turn(proxy, "sys", history, "four")  # the agent still holds the reverted turns
        assert sent_contents(upstream) == ["sys", "one", "echo: one", "four"]
        assert answer["headers"]["x-history-rewritten"] == "4"
        view = httpx.get(f"{proxy.url}/admin/sessions/{session}").json()
    assert view["session"]["branches"] == before  # no new branch
    active = [m["body"]["content"] for m in view["messages"] if m["active"]]
    assert active == ["sys", "one", "echo: one", "four", "echo: four"]


def test_keep_restores_the_old_behaviour(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = local_config(tmp_path, upstream.base_url, memory={"enabled": False}, sessions={"reverted_turns": "keep"})
    with start_thread(path) as proxy:
        history, session = converse(proxy, "sys", ["one", "two"])
        rolled = httpx.post(f"{proxy.url}/admin/sessions/{session}/rollback", json={"turns": 2})
        assert rolled.status_code == 200
        answer = agent_turn(proxy, "sys", history, "three")
    assert sent_contents(upstream) == ["sys", "one", "echo: one", "two", "echo: two", "three"]
    assert "x-history-rewritten" not in answer["headers"]


def test_a_fork_point_sticks_for_a_client_of_the_fork(tmp_path: Path, upstream: FakeUpstream) -> None:
    with local_proxy(tmp_path, upstream.base_url, memory={"enabled": False}) as proxy:
        history, session = converse(proxy, "sys", ["one", "two", "three"])
        forked = httpx.post(f"{proxy.url}/admin/sessions/{session}/fork", json={"turns": 2, "session_id": "fork-b"})
        assert forked.status_code == 201 and forked.json()["messages"] == 3
        messages = [{"role": "system", "content": "sys"}] + history + [{"role": "user", "content": "four"}]
        sent = httpx.post(proxy.base_url + "/chat/completions", headers={"X-Session-ID": "fork-b"},
                          json={"model": "fake-model", "messages": messages})
        assert sent.status_code == 200 and sent.headers["X-History-Rewritten"] == "4"
    assert sent_contents(upstream) == ["sys", "one", "echo: one", "four"]


def test_a_named_checkpoint_is_a_rollback_target(tmp_path: Path, upstream: FakeUpstream) -> None:
    with local_proxy(tmp_path, upstream.base_url, memory={"enabled": False}) as proxy:
        chat = httpx.Client(base_url=proxy.base_url, headers={"X-Session-ID": "named"})
        history = [{"role": "user", "content": "plan the migration"}]
        history.append(chat.post("/chat/completions", json={"model": "fake-model", "messages": history}).json()["choices"][0]["message"])
        made = httpx.post(f"{proxy.url}/admin/sessions/named/checkpoints", json={"name": "before-risky-step"})
        assert made.status_code == 201, made.text
        assert httpx.post(f"{proxy.url}/admin/sessions/named/checkpoints", json={"name": "before-risky-step"}).status_code == 409
        assert httpx.post(f"{proxy.url}/admin/sessions/named/checkpoints", json={"name": ""}).status_code == 400
        for text in ("drop the table", "restore it", "check it"):
            history.append({"role": "user", "content": text})
            history.append(chat.post("/chat/completions", json={"model": "fake-model", "messages": history}).json()["choices"][0]["message"])
        listed = httpx.get(f"{proxy.url}/admin/sessions/named/checkpoints").json()["data"]
        assert [c["name"] for c in listed if c["name"]] == ["before-risky-step"] and all(c["valid"] for c in listed)
        report = httpx.post(f"{proxy.url}/admin/sessions/named/rollback", json={"checkpoint": "before-risky-step"}).json()
        assert len(report["reverted"]) == 6 and report["head"] == made.json()["head"]
        chat.post("/chat/completions", json={"model": "fake-model", "messages": history + [{"role": "user", "content": "again"}]})
    assert sent_contents(upstream) == ["plan the migration", "echo: plan the migration", "again"]
