"""The proxy as a real process: SIGKILL between turns loses nothing; SIGTERM exits cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, local_config


@pytest.mark.parametrize("mode", ["sync", "hybrid"])
def test_conversation_continues_across_kill_9(tmp_path: Path, upstream: FakeUpstream, mode: str) -> None:
    config = local_config(tmp_path, upstream.base_url, persistence={"mode": mode})
    proxy = ProxyProcess(config).start()
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    headers = {"X-Session-ID": "survivor"}
    try:
        history = [{"role": "system", "content": "remember everything"}]
        for turn in range(2):
            history.append({"role": "user", "content": f"fact {turn}"})
            answer = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers=headers)
            history.append({"role": "assistant", "content": answer.choices[0].message.content})
        if mode == "hybrid":
            time.sleep(0.3)  # routine turns are batched: wait out the documented loss window (50 ms)
        proxy.kill()  # SIGKILL: no shutdown hook runs
        proxy.start()
        # The agent restarted too and only sends its new question: the proxy restores the rest.
        sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "what did I say?"}], extra_headers=headers)
        assert upstream.chat_requests[-1]["messages"] == history + [{"role": "user", "content": "what did I say?"}]
        view = httpx.get(f"{proxy.url}/admin/sessions/survivor").json()
        assert len(view["messages"]) == 7 and view["session"]["turns"] == 3
    finally:
        assert proxy.stop() == 0, proxy.log()  # SIGTERM: drains, closes the store, exits 0
