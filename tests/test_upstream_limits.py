"""An upstream reply larger than the tenant's max_response_bytes is refused, streamed or not."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import orjson
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, local_config, start_thread

CAP = 16 * 1024


@pytest.fixture
def capped(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    path = local_config(tmp_path, upstream.base_url, max_response_bytes=CAP)
    with start_thread(path) as running:
        yield running


def chat(proxy: ProxyThread, session: str, **extra) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "tell me everything"}]} | extra
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers={"X-Session-ID": session}, timeout=60)


def recorded(proxy: ProxyThread, session: str) -> list[dict]:
    return httpx.get(f"{proxy.url}/admin/sessions/{session}").json()["messages"]


def test_a_huge_reply_is_a_502_and_the_turn_is_recorded_as_an_error(capped: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.script_reply("x" * (4 * CAP))
    response = chat(capped, "big")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_response_too_large" and str(CAP) in error["message"]
    messages = recorded(capped, "big")
    assert [(m["role"], m["outcome"]) for m in messages] == [("user", "error")]  # the huge body is not stored
    # A reply within the cap still goes through.
    upstream.script_reply("small answer")
    assert chat(capped, "big").json()["choices"][0]["message"]["content"] == "small answer"


def test_a_huge_stream_ends_with_an_error_event_and_keeps_at_most_the_cap(capped: ProxyThread, upstream: FakeUpstream) -> None:
    # One chunk per word, a few ms apart: the first chunks reach the client before the cap is
    # crossed (a reply over the cap in its first network read is a plain 502 instead).
    upstream.chunk_delay = 0.005
    upstream.script_reply("word " * (3 * CAP // 200))  # ~200 bytes per chunk event: three times the cap
    events = []
    with httpx.stream("POST", f"{capped.base_url}/chat/completions", headers={"X-Session-ID": "flood"}, timeout=60,
                      json={"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "go on"}]}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] != "[DONE]"
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == "upstream_response_too_large"
    relayed = [orjson.loads(e) for e in events[:-1]]
    assert relayed and all("choices" in chunk for chunk in relayed)  # the part before the cap was relayed
    messages = recorded(capped, "flood")
    assert [(m["role"], m["outcome"]) for m in messages] == [("user", "error"), ("assistant", "error")]
    assert len(messages[1]["body"]["content"]) < CAP


def test_max_response_bytes_is_validated(tmp_path: Path, upstream: FakeUpstream) -> None:
    from proxy.config import ConfigError, load_config

    path = local_config(tmp_path, upstream.base_url, max_response_bytes="32MB")
    with pytest.raises(ConfigError, match=r"local\.yaml: max_response_bytes: must be an integer"):
        load_config(path)
