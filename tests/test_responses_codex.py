"""Codex CLI itself (`codex exec`) through the proxy's Responses API, against the fake chat upstream.

CI installs the CLI (.ci/run: `npm install -g @openai/codex`); the test skips only where the
`codex` binary cannot be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import open_tenant, start_thread, write_config

CODEX = shutil.which("codex")
pytestmark = pytest.mark.skipif(CODEX is None, reason="the codex CLI is not installed (npm install -g @openai/codex)")


def codex_home(directory: Path, base_url: str, extra: str = "") -> Path:
    """A CODEX_HOME whose config points Codex at the proxy, the way the README tells users to."""
    home = directory / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "fake-model"\n'
        'model_provider = "asp"\n'
        + extra +
        "[model_providers.asp]\n"
        'name = "agent-state-proxy"\n'
        f'base_url = "{base_url}"\n'
        'wire_api = "responses"\n'
        'env_key = "ASP_API_KEY"\n'
    )
    return home


def run_codex(home: Path, workdir: Path, prompt: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")} | {"CODEX_HOME": str(home), "ASP_API_KEY": "local-key"}
    return subprocess.run([CODEX, "exec", "--skip-git-repo-check", prompt], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_codex_exec_runs_a_tool_loop_recorded_as_one_session(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Codex's instructions and tools are ~10k tokens: more than the fallback window assumed for
    # a model litellm does not know ("fake-model"), so the tenant names a larger one.
    tenant = open_tenant(upstream.base_url, context={"fallback_context_window": 400000})
    with start_thread(write_config(tmp_path, {"local": tenant})) as proxy:
        workdir = tmp_path / "work"
        workdir.mkdir()
        upstream.script_tool_call("exec_command", {"cmd": "echo codex-through-the-proxy"})
        upstream.script_reply("All done: the command ran.")
        result = run_codex(codex_home(tmp_path, proxy.base_url), workdir, "Run echo for me")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "All done: the command ran." in result.stdout

        # Two model calls (the tool call, then the answer), each carrying Codex's whole input.
        calls = upstream.chat_requests
        assert len(calls) == 2
        assert calls[0]["stream"] is True and calls[0]["messages"][0]["role"] == "developer"
        names = {t["function"]["name"] for t in calls[0]["tools"]}
        assert "exec_command" in names and not any(t.get("type") == "web_search" for t in calls[0]["tools"])
        follow_up = calls[1]["messages"]
        assert follow_up[-2]["tool_calls"][0]["function"]["name"] == "exec_command"
        assert follow_up[-1]["role"] == "tool" and follow_up[-1]["tool_call_id"] == follow_up[-2]["tool_calls"][0]["id"]

        # One Codex session is one proxy session (its session-id header), nothing recorded twice.
        [session] = httpx.get(proxy.url + "/admin/sessions").json()["data"]
        messages = httpx.get(f"{proxy.url}/admin/sessions/{session['id']}").json()["messages"]
        roles = [m["role"] for m in messages]
        assert roles[-3:] == ["assistant", "tool", "assistant"]
        assert roles.count("user") == len([m for m in calls[0]["messages"] if m["role"] == "user"])
        assert messages[-1]["body"]["content"] == "All done: the command ran."
        session_line = next(line for line in result.stderr.splitlines() if line.startswith("session id:"))
        assert session["id"] == session_line.split(":", 1)[1].strip()



def test_codex_auto_compaction_goes_through_the_proxy_as_a_branch(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Codex 0.171 with a model_providers entry compacts locally: a summarization request through
    /v1/responses, then the turn goes on from the shorter history, which the transcript records as
    a branch (the full history stays on the old one)."""
    tenant = open_tenant(upstream.base_url, context={"fallback_context_window": 400000})
    with start_thread(write_config(tmp_path, {"local": tenant})) as proxy:
        workdir = tmp_path / "work"
        workdir.mkdir()
        upstream.script_tool_call("exec_command", {"cmd": "echo compact-me"})
        upstream.script_reply("Summary: ran echo compact-me.", "finished after compaction")
        home = codex_home(tmp_path, proxy.base_url, extra="model_auto_compact_token_limit = 3000\n")
        result = run_codex(home, workdir, "Run echo")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "context compacted" in result.stderr and "finished after compaction" in result.stdout
        calls = upstream.chat_requests
        assert len(calls) == 3
        assert "Summary: ran echo compact-me." in calls[2]["messages"][-1]["content"]
        assert not any(m["role"] in ("assistant", "tool") for m in calls[2]["messages"])  # the compacted history
        [session] = httpx.get(proxy.url + "/admin/sessions").json()["data"]
        assert session["branches"] >= 1
        messages = httpx.get(f"{proxy.url}/admin/sessions/{session['id']}").json()["messages"]
        active = [m for m in messages if m["active"]]
        assert active[-1]["body"]["content"] == "finished after compaction"
        assert any(m["role"] == "tool" and not m["active"] for m in messages)  # the pre-compaction turn, kept
