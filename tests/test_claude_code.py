"""Claude Code itself (`npm install -g @anthropic-ai/claude-code`) through the proxy to a fake
Anthropic upstream, offline: one `claude -p` prompt completes and becomes one proxy session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.harness import ProxyThread, start_thread, write_config

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="the Claude Code CLI is not installed (npm install -g @anthropic-ai/claude-code; .ci/run does)")


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic.run_in_thread(api_key="anthropic-upstream-key") as running:
        yield running


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeAnthropic) -> Iterator[ProxyThread]:
    # Claude Code's system prompt and 74 kB of tools exceed the fallback window of a model
    # litellm's table may not know yet: give the window explicitly.
    tenant = {"allow_unauthenticated": True, "context": {"context_window": 200000},
              "models": {"*": {"model": "anthropic/{model}", "api_base": fake.base_url, "api_key": "anthropic-upstream-key"}}}
    with start_thread(write_config(tmp_path / "config", {"local": tenant})) as running:
        yield running


def claude(proxy: ProxyThread, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "ANTHROPIC_BASE_URL": proxy.url,
           "ANTHROPIC_AUTH_TOKEN": "any-local-token", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    done = subprocess.run([CLAUDE, "-p", *args], env=env, cwd=workdir, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_claude_code_prompt_completes_through_the_proxy(tmp_path: Path, fake: FakeAnthropic, proxy: ProxyThread) -> None:
    done = claude(proxy, tmp_path, "Say hello to the proxy", "--max-turns", "1")
    assert "Fake Claude reply" in done.stdout
    sent = fake.messages_requests[-1]
    assert "claude-code" in sent.headers.get("anthropic-beta", "")
    assert sent.headers["x-api-key"] == "anthropic-upstream-key"  # the route's key, not the CLI's token
    assert any("Say hello to the proxy" in json.dumps(m) for m in sent.body["messages"])
    # One proxy session per Claude Code session, with no configuration: its id is the
    # CLI's session id; the user is its device (or account), not the whole JSON string.
    claude_ids = json.loads(sent.body["metadata"]["user_id"])
    sessions = httpx.get(proxy.url + "/admin/sessions", timeout=30).json()["data"]
    assert [s["id"] for s in sessions] == [claude_ids["session_id"]]
    assert sessions[0]["user_id"] == (claude_ids.get("account_uuid") or claude_ids["device_id"])
    recorded = httpx.get(f"{proxy.url}/admin/sessions/{sessions[0]['id']}", timeout=30).json()["messages"]
    assert recorded[-1]["role"] == "assistant" and "Fake Claude reply" in json.dumps(recorded[-1]["body"])


def test_claude_code_runs_a_tool_and_continues_in_a_new_process(tmp_path: Path, fake: FakeAnthropic, proxy: ProxyThread) -> None:
    fake.call_tool("Bash", {"command": "echo tool-ran-$((6*7))", "description": "print a marker"})
    done = claude(proxy, tmp_path, "Run the marker command", "--max-turns", "3", "--allowedTools", "Bash(echo:*)")
    # Claude Code ran the command and sent its result back with the signed thinking block the
    # upstream gave it (the fake refuses a changed signature).
    assert "tool said: tool-ran-42" in done.stdout
    last = fake.messages_requests[-1].body["messages"]
    assert [b["type"] for b in last[-2]["content"]] == ["thinking", "tool_use"]
    assert last[-1]["content"][0]["type"] == "tool_result"
    # A new process continues the conversation: it resends the history (its cache breakpoint on
    # another turn now, its mid-conversation system message left out), which the proxy
    # recognises: one session, nothing recorded twice, no branch.
    claude(proxy, tmp_path, "and now?", "--continue", "--max-turns", "1")
    sessions = httpx.get(proxy.url + "/admin/sessions", timeout=30).json()["data"]
    assert len(sessions) == 1 and sessions[0]["branches"] == 0
    sent = fake.messages_requests[-1].body["messages"]
    recorded = httpx.get(f"{proxy.url}/admin/sessions/{sessions[0]['id']}", timeout=30).json()["messages"]
    turns = [m for m in recorded if m["role"] != "system"]
    assert all(m["active"] for m in recorded)
    assert [m["role"] for m in turns] == [m["role"] for m in sent] + ["assistant"]
    assert turns[-2]["body"]["content"][0]["text"] == "and now?"
