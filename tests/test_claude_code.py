"""Claude Code itself (`npm install -g @anthropic-ai/claude-code`) through the proxy to a fake
Anthropic upstream, offline: one `claude -p` prompt completes and becomes one proxy session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.harness import start_thread, write_config

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="the Claude Code CLI is not installed (npm install -g @anthropic-ai/claude-code; .ci/run does)")


def test_claude_code_prompt_completes_through_the_proxy(tmp_path: Path) -> None:
    with FakeAnthropic.run_in_thread(api_key="anthropic-upstream-key") as fake:
        # Claude Code's system prompt and ~60 kB of tools exceed the fallback window of a model
        # litellm's table may not know yet: give the window explicitly.
        tenant = {"allow_unauthenticated": True, "context": {"context_window": 200000},
                  "models": {"*": {"model": "anthropic/{model}", "api_base": fake.base_url, "api_key": "anthropic-upstream-key"}}}
        with start_thread(write_config(tmp_path / "config", {"local": tenant})) as proxy:
            home = tmp_path / "home"
            home.mkdir()
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "ANTHROPIC_BASE_URL": proxy.url,
                   "ANTHROPIC_AUTH_TOKEN": "any-local-token", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
                   "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
            done = subprocess.run([CLAUDE, "-p", "Say hello to the proxy", "--max-turns", "1"], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stderr[-2000:]
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
