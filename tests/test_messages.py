"""The Anthropic Messages API end to end: the official anthropic SDK → the proxy → a fake Anthropic
upstream (native path) or the fake OpenAI-compatible upstream (translated path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import orjson
import pytest

from tests.fake_anthropic import FakeAnthropic, sign
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, ProxyThread, local_proxy, start_thread, write_config

UPSTREAM_KEY = "anthropic-upstream-key"
MODEL = "claude-test-1"
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}


def anthropic_tenant(fake: FakeAnthropic, **extra: Any) -> dict[str, Any]:
    return {"allow_unauthenticated": True, "models": {"*": {"model": "anthropic/{model}", "api_base": fake.base_url, "api_key": UPSTREAM_KEY}}} | extra


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic.run_in_thread(api_key=UPSTREAM_KEY) as running:
        yield running


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeAnthropic) -> Iterator[ProxyThread]:
    with start_thread(write_config(tmp_path, {"local": anthropic_tenant(fake)})) as running:
        yield running


def client(proxy: ProxyThread | ProxyProcess, session: str | None = None) -> anthropic.Anthropic:
    headers = {"X-Session-ID": session} if session else None
    return anthropic.Anthropic(base_url=proxy.url, api_key="any-local-key", default_headers=headers, max_retries=0)


def test_create_returns_the_upstream_message_and_forwards_headers(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    reply = client(proxy).messages.create(
        model=MODEL, max_tokens=100, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hello there"}], metadata={"user_id": "u-1"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14", "anthropic-version": "2023-06-01"},
        extra_body={"context_management": {"edits": []}, "top_k": 5, "temperature": 0.5},
    )
    assert reply.content[0].text == "Fake Claude reply 1 to: hello there"
    assert reply.stop_reason == "end_turn" and reply.usage.input_tokens > 0
    received = fake.messages_requests[-1]
    assert received.headers["x-api-key"] == UPSTREAM_KEY  # the route's key, never the client's
    assert received.headers["anthropic-beta"] == "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"
    assert received.headers["anthropic-version"] == "2023-06-01"
    body = received.body
    assert body["model"] == MODEL
    assert body["system"] == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    assert body["top_k"] == 5 and body["temperature"] == 0.5 and body["metadata"] == {"user_id": "u-1"}
    assert body["context_management"] == {"edits": []}  # unknown fields reach an Anthropic upstream


def test_stream_relays_every_event_in_order(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    with httpx.stream("POST", proxy.url + "/v1/messages?beta=true", headers={"anthropic-version": "2023-06-01"}, timeout=30,
                      json={"model": MODEL, "max_tokens": 50, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 1024},
                            "tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": "CALL_TOOL:get_weather please"}]}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert "fake_annotation" in names  # unknown event types are relayed
    deltas = [json.loads(line[6:])["delta"]["type"] for line in text.splitlines() if line.startswith("data: ") and '"content_block_delta"' in line]
    assert {"thinking_delta", "signature_delta", "text_delta", "input_json_delta"} <= set(deltas)
    assert names.count("content_block_start") == names.count("content_block_stop") == 3


def test_sdk_stream_and_tool_round_trip_with_thinking_passed_back_unchanged(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    sdk = client(proxy, "tools-1")
    history: list[dict[str, Any]] = [{"role": "user", "content": "CALL_TOOL:get_weather in Paris"}]
    with sdk.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL], messages=history,
                             thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        first = stream.get_final_message()
    kinds = [b.type for b in first.content]
    assert kinds == ["thinking", "text", "tool_use"] and first.stop_reason == "tool_use"
    thinking, call = first.content[0], first.content[2]
    assert thinking.signature == sign(thinking.thinking)
    assert call.input == {"query": "weather", "n": 1}
    history += [{"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21°C"}]}]
    second = sdk.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL], messages=history, thinking={"type": "enabled", "budget_tokens": 1024})
    assert second.content[-1].text == "tool said: sunny, 21°C"
    # What the upstream received back is the block it sent: text and signature, byte for byte.
    sent_block = fake.sent[0]["content"][0]
    received = fake.messages_requests[-1]
    assert received.body["messages"][1]["content"][0] == sent_block
    for key in ("thinking", "signature"):  # the JSON string bytes themselves, as the upstream wrote them
        assert orjson.dumps({key: sent_block[key]})[1:-1] in received.raw
    # And the proxy recorded the turn as one session with the tool call.
    stored = httpx.get(proxy.url + "/admin/sessions/tools-1").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][1]["body"]["content"][0] == fake.sent[0]["content"][0]


def test_count_tokens_is_answered_by_the_anthropic_upstream(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    counted = client(proxy).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "how many tokens is this"}])
    assert counted.input_tokens == max(1, len(orjson.dumps([{"role": "user", "content": "how many tokens is this"}])) // 4)
    assert fake.requests[-1].path == "/v1/messages/count_tokens"


@pytest.mark.parametrize(("body", "status", "kind", "words"), [
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request_error", "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, 400, "invalid_request_error", "type"),
    ({"model": MODEL, "max_tokens": 5, "api_base": "http://evil", "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "api_base"),
])
def test_bad_input_gets_an_anthropic_shaped_4xx(proxy: ProxyThread, fake: FakeAnthropic, body: dict, status: int, kind: str, words: str) -> None:
    # Raw HTTP: the SDK itself refuses some of these before sending.
    response = httpx.post(proxy.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}, timeout=30)
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and words in error["error"]["message"]
    assert fake.messages_requests == []  # nothing reached the upstream


def test_malformed_json_gets_an_anthropic_shaped_400(proxy: ProxyThread) -> None:
    response = httpx.post(proxy.url + "/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_auth_and_unknown_model_errors_are_anthropic_shaped(tmp_path: Path, fake: FakeAnthropic) -> None:
    from proxy.config import hash_key

    tenant = {"api_key_sha256": [hash_key("team-key-1")], "models": {"claude-known": {"model": "anthropic/claude-known", "api_base": fake.base_url, "api_key": UPSTREAM_KEY}}}
    with start_thread(write_config(tmp_path, {"team": tenant})) as proxy:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            anthropic.Anthropic(base_url=proxy.url, api_key="wrong-key", max_retries=0).messages.create(
                model="claude-known", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert raised.value.body["error"]["type"] == "authentication_error"
        good = anthropic.Anthropic(base_url=proxy.url, api_key="team-key-1", max_retries=0)
        assert good.messages.create(model="claude-known", max_tokens=5, messages=[{"role": "user", "content": "hi"}]).content[0].text
        bearer = anthropic.Anthropic(base_url=proxy.url, auth_token="team-key-1", max_retries=0)  # Claude Code's ANTHROPIC_AUTH_TOKEN
        assert bearer.messages.create(model="claude-known", max_tokens=5, messages=[{"role": "user", "content": "hi"}]).content[0].text
        with pytest.raises(anthropic.NotFoundError) as missing:
            good.messages.create(model="claude-unknown", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert missing.value.body["error"]["type"] == "not_found_error"
        as_x_api_key = httpx.post(proxy.url + "/v1/messages", headers={"x-api-key": "team-key-1", "anthropic-version": "2023-06-01"},
                                  json={"model": "claude-known", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert as_x_api_key.status_code == 200 and as_x_api_key.json()["type"] == "message"
        assert httpx.head(proxy.url + "/").status_code == 200


def test_error_event_mid_stream(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as raised:
        with client(proxy).messages.stream(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "FAIL_MIDSTREAM now"}]) as stream:
            for _ in stream:
                pass
    assert raised.value.body["error"]["type"] == "overloaded_error"


def test_claude_code_session_ids_need_no_configuration(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    user_id = json.dumps({"device_id": "dev-1", "account_uuid": "acct-7", "session_id": "cc-session-9"})
    sdk = client(proxy)
    sdk.messages.create(model=MODEL, max_tokens=20, metadata={"user_id": user_id}, messages=[{"role": "user", "content": "first"}])
    sdk.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "other"}],
                        extra_headers={"X-Claude-Code-Session-Id": "cc-header-3"})
    found = {s["id"]: s for s in httpx.get(proxy.url + "/admin/sessions").json()["data"]}
    assert found["cc-session-9"]["user_id"] == "acct-7"  # the account, not the whole JSON string
    assert "cc-header-3" in found
    assert fake.messages_requests[0].body["metadata"] == {"user_id": user_id}  # Anthropic's field, forwarded as sent


def without_cache_hints(value: Any) -> Any:
    """``value`` without the cache_control breakpoints the proxy adds where a client set none
    (context.cache_breakpoints, docs/CONTEXT.md); a system prompt as its text."""
    if isinstance(value, list):
        if value and all(isinstance(b, dict) and b.get("type") == "text" and set(b) <= {"type", "text", "cache_control"} for b in value):
            if len(value) == 1 and "cache_control" in value[0]:
                return value[0]["text"]
        return [without_cache_hints(v) for v in value]
    if isinstance(value, dict):
        return {k: without_cache_hints(v) for k, v in value.items() if k != "cache_control"}
    return value


def test_mid_conversation_system_message_is_accepted(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ok"},
                {"role": "system", "content": "The user switched to plan mode."}, {"role": "user", "content": "two"}]
    reply = client(proxy).messages.create(model=MODEL, max_tokens=20, system="base prompt", messages=messages)
    assert reply.content[0].text.endswith("two")
    body = fake.messages_requests[-1].body
    assert without_cache_hints(body["system"]) == "base prompt" and without_cache_hints(body["messages"]) == messages


def test_history_restored_after_sigkill_and_unpaired_tool_use_repaired(tmp_path: Path, fake: FakeAnthropic) -> None:
    config = write_config(tmp_path, {"local": anthropic_tenant(fake, persistence={"mode": "sync"})})
    proxy = ProxyProcess(config).start()
    try:
        sdk = client(proxy, "restart-1")
        first = sdk.messages.create(model=MODEL, max_tokens=50, system="You are terse.", thinking={"type": "enabled", "budget_tokens": 1024},
                                    messages=[{"role": "user", "content": "remember the word tangerine"}])
        proxy.kill()
        proxy = ProxyProcess(config, port=proxy.port).start()
        # The agent restarted too: it sends only its new message.
        with sdk.messages.stream(model=MODEL, max_tokens=50, system="You are terse.", thinking={"type": "enabled", "budget_tokens": 1024},
                                 tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "CALL_TOOL:get_weather and the word?"}]) as stream:
            second = stream.get_final_message()
        received = fake.messages_requests[-1].body
        assert [m["role"] for m in received["messages"]] == ["user", "assistant", "user"]
        assert received["messages"][0]["content"] == "remember the word tangerine"
        # The thinking block byte for byte (the fake checked its signature); the proxy may add a cache breakpoint.
        assert without_cache_hints(received["messages"][1]["content"]) == [b.model_dump(exclude_none=True) for b in first.content]
        assert received["messages"][1]["content"][0] == first.content[0].model_dump(exclude_none=True)
        assert without_cache_hints(received["system"]) == "You are terse."
        assert second.stop_reason == "tool_use"
        proxy.kill()
        proxy = ProxyProcess(config, port=proxy.port).start()
        # Crashed mid-tool: the stored history ends in a tool_use with no result. Restored, it
        # must reach the provider answered (an error result), never as the provider refuses it.
        raw = client(proxy, "restart-1").messages.with_raw_response.create(model=MODEL, max_tokens=50, system="You are terse.", tools=[WEATHER_TOOL],
                                                                           messages=[{"role": "user", "content": "never mind, hello"}])
        assert raw.headers["X-Tool-Calls-Repaired"] == "1" and raw.headers["X-History-Restored"] == "5"  # the system prompt and two turns
        assert raw.parse().content[-1].type == "text"
        received = fake.messages_requests[-1].body["messages"]
        assert [m["role"] for m in received] == ["user", "assistant", "user", "assistant", "user"]
        repaired = received[-1]["content"]
        assert repaired[0]["type"] == "tool_result" and repaired[0]["is_error"] is True
        assert repaired[0]["tool_use_id"] == second.content[-1].id
        assert repaired[-1] == {"type": "text", "text": "never mind, hello"}
    finally:
        proxy.stop()


# -- translated: an OpenAI-compatible upstream -------------------------------------------------

@pytest.fixture
def chat_proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    with local_proxy(tmp_path, upstream.base_url) as running:
        yield running


def test_translated_create_stream_and_tools(chat_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk = client(chat_proxy, "translated-1")
    upstream.script_reply("Hi from chat.")
    reply = sdk.messages.create(model="fake-model", max_tokens=64, system=[{"type": "text", "text": "Be kind."}], extra_body={"top_k": 3},
                                messages=[{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                       {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert reply.content[0].text == "Hi from chat." and reply.stop_reason == "end_turn"
    sent = upstream.requests[-1]["json"]
    assert sent["messages"][0] == {"role": "system", "content": "Be kind."}
    assert sent["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert sent["max_tokens"] == 64 and "top_k" not in sent  # chat cannot carry top_k

    upstream.script_tool_call("get_weather", {"query": "Paris"})
    history: list[dict[str, Any]] = [{"role": "user", "content": "weather?"}]
    with sdk.messages.stream(model="fake-model", max_tokens=64, tools=[WEATHER_TOOL], messages=history) as stream:
        called = stream.get_final_message()
    call = called.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"query": "Paris"}
    assert called.stop_reason == "tool_use"
    assert upstream.requests[-1]["json"]["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]
    upstream.script_reply("It is sunny.")
    history += [{"role": "assistant", "content": called.content}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    final = sdk.messages.create(model="fake-model", max_tokens=64, tools=[WEATHER_TOOL], messages=history)
    assert final.content[0].text == "It is sunny."
    chat = upstream.requests[-1]["json"]["messages"]
    assert chat[-2]["tool_calls"][0]["id"] == call.id and chat[-1] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}


def test_a_conversation_recorded_through_messages_continues_through_chat_completions(chat_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    from openai import OpenAI

    sdk = client(chat_proxy, "cross-1")
    upstream.script_tool_call("get_weather", {"query": "Oslo"})
    called = sdk.messages.create(model="fake-model", max_tokens=64, tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "weather in Oslo?"}])
    call = called.content[-1]
    upstream.script_reply("Cold.")
    sdk.messages.create(model="fake-model", max_tokens=64, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather in Oslo?"}, {"role": "assistant", "content": called.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "-5°C"}]}])
    # The agent switches to the OpenAI SDK (or restarts) and sends only its new message.
    upstream.script_reply("Bring a coat.")
    chat = OpenAI(base_url=chat_proxy.base_url, api_key="x", max_retries=0)
    reply = chat.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "what should I wear?"}], extra_headers={"X-Session-ID": "cross-1"})
    assert reply.choices[0].message.content == "Bring a coat."
    sent = upstream.requests[-1]["json"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "-5°C"}
    assert sent[3]["content"] == "Cold."


def test_an_upstream_refusal_reaches_the_client_in_anthropic_shape(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    forged = [{"type": "thinking", "thinking": "I was never said", "signature": "forged"}, {"type": "text", "text": "ok"}]
    with pytest.raises(anthropic.BadRequestError) as raised:
        client(proxy).messages.create(model=MODEL, max_tokens=20, messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": forged}, {"role": "user", "content": "b"}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "Invalid `signature`" in raised.value.body["error"]["message"]


def test_a_repeated_idempotency_key_replays_the_recorded_answer(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    sdk = client(proxy, "idem-1")
    ask = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "only once"}], "extra_headers": {"Idempotency-Key": "k-1"}}
    first = sdk.messages.create(**ask)
    again = sdk.messages.create(**ask)
    assert again.model_dump() == first.model_dump() and len(fake.messages_requests) == 1
    streamed = {**ask, "extra_headers": {"Idempotency-Key": "k-2"}, "messages": [{"role": "user", "content": "stream once"}]}
    with sdk.messages.stream(**streamed) as stream:
        one = stream.get_final_message()
    with sdk.messages.stream(**streamed) as stream:
        two = stream.get_final_message()
    assert two.model_dump() == one.model_dump() and len(fake.messages_requests) == 2


def test_an_sdk_client_without_session_ids_keeps_one_implicit_session_while_its_cache_breakpoint_moves(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    sdk = client(proxy)
    cached = {"type": "ephemeral"}
    first = sdk.messages.create(model=MODEL, max_tokens=20, system="sys", messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello", "cache_control": cached}]}])
    sdk.messages.create(model=MODEL, max_tokens=20, system="sys", messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "text", "text": "again", "cache_control": cached}]}])
    sessions = httpx.get(proxy.url + "/admin/sessions").json()["data"]
    assert len(sessions) == 1 and sessions[0]["id"].startswith("implicit-")
    stored = httpx.get(f"{proxy.url}/admin/sessions/{sessions[0]['id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["system", "user", "assistant", "user", "assistant"]  # the resent turns matched, none twice


def test_translated_stream_failures_are_anthropic_errors(chat_proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk = client(chat_proxy, "translated-errors")
    upstream.fail_next(429, "slow down")
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(model="fake-model", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert limited.value.body["error"]["type"] == "rate_limit_error" and "slow down" in limited.value.body["error"]["message"]
    upstream.script_reply("a long enough answer to be cut in the middle")
    upstream.fail_mid_stream(after_chunks=2)
    with pytest.raises(anthropic.APIStatusError) as cut:
        with sdk.messages.stream(model="fake-model", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as stream:
            for _ in stream:
                pass
    assert cut.value.body["type"] == "error" and cut.value.body["error"]["type"] == "api_error"


def test_an_overloaded_upstream_keeps_its_error_type(proxy: ProxyThread, fake: FakeAnthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as raised:
        client(proxy).messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "OVERLOADED please"}])
    assert raised.value.status_code == 502 and raised.value.body["error"]["type"] == "overloaded_error"


def test_the_fake_upstream_refuses_what_anthropic_refuses(fake: FakeAnthropic) -> None:
    # The repair and signature tests above mean something only if this fake is strict.
    sdk = anthropic.Anthropic(base_url=fake.base_url.removesuffix("/v1"), api_key=UPSTREAM_KEY, max_retries=0)
    unpaired = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}]},
                {"role": "user", "content": "b"}]
    with pytest.raises(anthropic.BadRequestError, match="tool_use ids were found without tool_result"):
        sdk.messages.create(model=MODEL, max_tokens=5, messages=unpaired)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=fake.base_url.removesuffix("/v1"), api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "a"}])


def test_the_tenants_request_limits_apply_to_messages_too(tmp_path: Path, fake: FakeAnthropic) -> None:
    config = write_config(tmp_path, {"local": anthropic_tenant(fake, limits={"max_messages": 3})})
    with start_thread(config) as proxy:
        turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
        refused = httpx.post(f"{proxy.url}/v1/messages", json={"model": MODEL, "max_tokens": 10, "messages": turns + turns[:1]})
        assert refused.status_code == 413, refused.text
        assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "request_too_large"
        assert "at most 3" in refused.json()["error"]["message"] and fake.messages_requests == []
        accepted = httpx.post(f"{proxy.url}/v1/messages", json={"model": MODEL, "max_tokens": 10, "messages": turns[:3]})
        assert accepted.status_code == 200, accepted.text
