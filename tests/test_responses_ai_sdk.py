"""The Vercel AI SDK (`ai` + `@ai-sdk/openai`, Responses API by default) through the proxy.

CI installs the packages into .ci/node (see .ci/run); the test skips only where node or the
packages cannot be had.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import REPO

NODE = shutil.which("node")
MODULES = Path(os.environ.get("ASP_NODE_MODULES", REPO / ".ci" / "node" / "node_modules"))
SCRIPT = Path(__file__).parent / "clients" / "ai_sdk_responses.mjs"
pytestmark = pytest.mark.skipif(NODE is None or not (MODULES / "@ai-sdk" / "openai").is_dir(),
                                reason="node or the AI SDK packages are not installed (.ci/run: npm install --prefix .ci/node ai @ai-sdk/openai)")


def test_ai_sdk_tool_loop_then_stream_chained_by_previous_response_id(tmp_path: Path, proxy, upstream: FakeUpstream) -> None:
    # ESM resolves packages from the script's directory upwards (not NODE_PATH): run a copy
    # beside a link to the modules.
    script = tmp_path / "client" / SCRIPT.name
    script.parent.mkdir()
    shutil.copyfile(SCRIPT, script)
    (script.parent / "node_modules").symlink_to(MODULES, target_is_directory=True)
    upstream.script_tool_call("get_weather", {"city": "Oslo"})
    upstream.script_reply("Oslo is sunny.", "Tomorrow too.")
    result = subprocess.run([NODE, str(script)], env=os.environ | {"ASP_BASE_URL": proxy.base_url}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["first"] == "Oslo is sunny." and output["steps"] == 2 and output["second"] == "Tomorrow too."
    tool_turn, chained = upstream.chat_requests[1]["messages"], upstream.chat_requests[2]["messages"]
    assert tool_turn[-1] == {"role": "tool", "tool_call_id": tool_turn[-2]["tool_calls"][0]["id"], "content": "sunny in Oslo"}
    assert [m["role"] for m in chained] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert chained[-1]["content"] == "And tomorrow?" and upstream.chat_requests[2]["stream"] is True
