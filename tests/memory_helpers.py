"""Helpers shared by the memory tests: wait for background indexing, read headers and stats,
script the fake upstream as the extractor model."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai

from proxy.memory import extract_llm
from proxy.memory.inject import HEADER
from proxy.memory.service import MemoryService
from proxy.server import keys
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, start_thread

Reply = dict[str, Any] | str | Callable[[dict[str, Any]], Any]

SLOW_OK = 5000  # ms: a generous latency budget so a busy test machine never skips retrieval


def drain(proxy: ProxyThread) -> None:
    """Wait until every recorded message is embedded, stored and indexed."""
    assert proxy.app is not None
    deadline = time.monotonic() + 30
    while proxy.app[keys.PIPELINE].memory is None:  # memory starts in the background
        assert time.monotonic() < deadline, "long-term memory never started"
        time.sleep(0.01)
    proxy.call(proxy.app[keys.PIPELINE].memory.drain(), timeout=60)


def chat(proxy: ProxyThread, text: str, *, user: str | None = None, session: str | None = None, key: str = "local-key",
         history: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, str]]:
    """One chat turn through the official SDK; returns the answer and the response headers."""
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    headers = {}
    if user is not None:
        headers["X-User-ID"] = user
    if session is not None:
        headers["X-Session-ID"] = session
    raw = sdk.chat.completions.with_raw_response.create(
        model="fake-model", messages=(history or []) + [{"role": "user", "content": text}], extra_headers=headers,
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def injected_ids(headers: dict[str, str]) -> list[str]:
    value = headers.get("x-memory-ids")
    return value.split(",") if value else []


def memory_stats(proxy: ProxyThread, key: str = "local-key") -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/admin/memory", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def system_prompt(request: dict[str, Any]) -> str:
    first = request["messages"][0]
    return first["content"] if first["role"] == "system" else ""


def recalled_block(request: dict[str, Any]) -> str:
    """The recalled-memory block of a forwarded request ("" when none), checking where it is:
    a user message right before the newest user message, never in the system prompt (it
    changes every turn; in front it would cost the provider's cached prefix)."""
    messages = request["messages"]
    assert HEADER not in system_prompt(request), "recalled memories in the system prompt"
    blocks = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and m["content"].startswith(HEADER)]
    if not blocks:
        return ""
    assert len(blocks) == 1 and messages[blocks[0]]["role"] == "user"
    newest = max(i for i, m in enumerate(messages) if m["role"] == "user")
    assert blocks[0] == newest - 1, "the memory block is not right before the newest user message"
    return messages[blocks[0]]["content"]


def memory_text(request: dict[str, Any]) -> str:
    """What memory added to a forwarded request: the system prompt (standing preferences go
    there) and the recalled-memory block (see ``recalled_block``)."""
    return system_prompt(request) + "\n\n" + recalled_block(request)


def wait_for_embedder(proxy: ProxyThread, key: str = "local-key") -> None:
    """Wait until the tenant's embedder answered its first call (a remote one is probed at start)."""
    deadline = time.monotonic() + 30
    while not memory_stats(proxy, key).get("embedder", {}).get("ready"):
        assert time.monotonic() < deadline, "the embedder never became ready"
        time.sleep(0.02)


@contextlib.contextmanager
def running(config_path: Path) -> Iterator[ProxyThread]:
    """The proxy from this config, once its long-term memory (started in the background) is ready."""
    with start_thread(config_path) as proxy:
        if any(t.memory.enabled and not t.stateless for t in proxy.config.tenants.values()):
            drain(proxy)
        yield proxy


def quiet(proxy: ProxyThread, *, attempts: int = 3) -> MemoryService:
    """Extraction runs only when the test drains (no run of its own after 2 quiet seconds)."""
    assert proxy.app is not None and proxy.app[keys.PIPELINE].memory is not None
    service = proxy.app[keys.PIPELINE].memory
    extractor = service.learning.extractor
    extractor.delay, extractor.retry_base, extractor.attempts = 3600.0, 0.05, attempts
    return service


class Extractor:
    """The fake upstream answering extractor calls (recognised by their system prompt) with
    scripted replies, and everything else with its default echo."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.replies: list[Reply] = []
        self.calls: list[dict[str, Any]] = []
        upstream.responder = self._respond

    def _respond(self, body: dict[str, Any]) -> str | None:
        if body["messages"][0].get("content") != extract_llm.PROMPT:
            return None
        self.calls.append(body)
        reply = self.replies.pop(0) if self.replies else {"memories": []}
        if callable(reply):
            reply = reply(body)
        return reply if isinstance(reply, str) else json.dumps(reply)


def known_ids(body: dict[str, Any]) -> list[str]:
    """The memory ids an extractor call was shown (the user's current extracted memories)."""
    return re.findall(r"^\[(mem_[0-9a-f]+)\]", body["messages"][1]["content"], flags=re.M)
