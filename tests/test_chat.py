"""End to end through the real proxy with the official OpenAI SDK: conversations, restore, branches."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread

SYSTEM = {"role": "system", "content": "You are terse."}


def client(proxy: ProxyThread, key: str = "any-local-key", base_url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url or proxy.base_url, api_key=key, max_retries=0)


def admin_session(proxy: ProxyThread, session_id: str, key: str = "any") -> dict:
    response = httpx.get(f"{proxy.url}/admin/sessions/{session_id}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def active_contents(view: dict) -> list[tuple[str, str | None]]:
    return [(m["role"], m["body"].get("content")) for m in view["messages"] if m["active"]]


def test_three_turns_with_full_history_record_each_message_once(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk, history = client(proxy), [SYSTEM]
    for question in ("one", "two", "three"):
        history.append({"role": "user", "content": question})
        raw = sdk.chat.completions.with_raw_response.create(model="fake-model", messages=history, extra_headers={"X-Session-ID": "full"})
        reply = raw.parse()
        assert raw.headers["x-session-id"] == "full"
        assert reply.choices[0].message.content == f"echo: {question}"
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert [len(r["messages"]) for r in upstream.chat_requests] == [2, 4, 6]
    view = admin_session(proxy, "full")
    assert active_contents(view) == [(m["role"], m["content"]) for m in history]
    assert len(view["messages"]) == 7  # nothing recorded twice
    assert view["session"]["turns"] == 3 and view["session"]["branches"] == 0
    assistant = view["messages"][-1]
    assert assistant["model"] == "fake-model" and assistant["finish_reason"] == "stop" and assistant["outcome"] == "ok"
    assert assistant["tokens"] > 0 and assistant["latency_ms"] >= 0 and assistant["request_id"].startswith("req-")


def test_agent_that_forgot_its_history_gets_it_restored(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk, headers = client(proxy), {"X-Session-ID": "amnesia"}
    sdk.chat.completions.create(model="fake-model", messages=[SYSTEM, {"role": "user", "content": "my name is Ada"}], extra_headers=headers)
    raw = sdk.chat.completions.with_raw_response.create(model="fake-model", messages=[{"role": "user", "content": "what is my name?"}], extra_headers=headers)
    assert raw.headers["x-history-restored"] == "3"
    assert upstream.chat_requests[-1]["messages"] == [
        SYSTEM,
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "echo: my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]
    # The restarted agent now keeps its own (short) history; it is aligned, not branched.
    sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "what is my name?"}, {"role": "assistant", "content": "echo: what is my name?"}, {"role": "user", "content": "thanks"}],
        extra_headers=headers,
    )
    assert len(upstream.chat_requests[-1]["messages"]) == 6
    view = admin_session(proxy, "amnesia")
    assert len(view["messages"]) == 7 and view["session"]["branches"] == 0


def test_session_from_path_prefix_and_metadata(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    raw = client(proxy, base_url=f"{proxy.url}/s/from-path/v1").chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-session-id"] == "from-path"
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], metadata={"session_id": "from-body", "purpose": "test"}
    )
    assert raw.headers["x-session-id"] == "from-body"
    assert upstream.chat_requests[-1]["metadata"] == {"purpose": "test"}  # proxy's own field stripped
    admin_session(proxy, "from-path"), admin_session(proxy, "from-body")


async def test_implicit_sessions_keep_concurrent_conversations_apart(proxy: ProxyThread) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)

    async def conversation(topic: str) -> str:
        history = [{"role": "system", "content": f"expert on {topic}"}]
        session = ""
        for turn in range(3):
            history.append({"role": "user", "content": f"{topic} question {turn}"})
            raw = await sdk.chat.completions.with_raw_response.create(model="fake-model", messages=history)
            session = raw.headers["x-session-id"]
            history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
        return session

    first, second = await asyncio.gather(conversation("cats"), conversation("boats"))
    await sdk.close()
    assert first != second and first.startswith("implicit-")
    for session, topic in ((first, "cats"), (second, "boats")):
        contents = [c for _, c in active_contents(admin_session(proxy, session))]
        assert len(contents) == 7 and all(topic in c for c in contents)


def test_regeneration_records_a_branch_not_a_duplicate(proxy: ProxyThread) -> None:
    sdk, headers = client(proxy), {"X-Session-ID": "regen"}
    question = [{"role": "user", "content": "pick a number"}]
    sdk.chat.completions.create(model="fake-model", messages=question, extra_headers=headers)
    sdk.chat.completions.create(model="fake-model", messages=question, extra_headers=headers)
    view = admin_session(proxy, "regen")
    roles = [m["role"] for m in view["messages"]]
    assert roles == ["user", "assistant", "assistant"]  # the question once, two answers
    assert view["session"]["branches"] == 1
    assert [m["active"] for m in view["messages"]] == [True, False, True]
    assert view["messages"][2]["parent"] == view["messages"][0]["seq"]


def test_edited_history_branches_and_moves_the_active_path(proxy: ProxyThread) -> None:
    sdk, headers = client(proxy), {"X-Session-ID": "edit"}
    history = [{"role": "user", "content": "a"}]
    answer = sdk.chat.completions.create(model="fake-model", messages=history, extra_headers=headers).choices[0].message.content
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "b"}]
    sdk.chat.completions.create(model="fake-model", messages=history, extra_headers=history and headers)
    history[-1] = {"role": "user", "content": "b, edited"}
    sdk.chat.completions.create(model="fake-model", messages=history, extra_headers=headers)
    view = admin_session(proxy, "edit")
    assert active_contents(view)[-2:] == [("user", "b, edited"), ("assistant", "echo: b, edited")]
    assert len(view["messages"]) == 6 and view["session"]["branches"] == 1


def test_streaming_with_usage_is_relayed_and_recorded(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk = client(proxy)
    stream = sdk.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "stream me a long answer please"}],
        stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-ID": "stream"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me a long answer please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    view = admin_session(proxy, "stream")
    assistant = view["messages"][-1]
    assert assistant["body"] == {"role": "assistant", "content": text}
    assert assistant["outcome"] == "ok" and assistant["finish_reason"] == "stop"
    assert view["session"]["completion_tokens"] == chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_round_trip(proxy: ProxyThread, upstream: FakeUpstream, stream: bool) -> None:
    sdk, headers = client(proxy), {"X-Session-ID": f"tools-{stream}"}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = [{"role": "user", "content": 'CALL_TOOL:get_weather {"city": "Oslo"}'}]
    if stream:
        chunks = list(sdk.chat.completions.create(model="fake-model", messages=history, tools=tools, stream=True, extra_headers=headers))
        deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        call = {"id": deltas[0].id, "type": "function", "function": {"name": deltas[0].function.name, "arguments": "".join(d.function.arguments or "" for d in deltas)}}
    else:
        message = sdk.chat.completions.create(model="fake-model", messages=history, tools=tools, extra_headers=headers).choices[0].message
        call = message.tool_calls[0].model_dump()
    assert call["function"]["name"] == "get_weather" and '"Oslo"' in call["function"]["arguments"]
    history += [{"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    sdk.chat.completions.create(model="fake-model", messages=history, tools=tools, extra_headers=headers)
    view = admin_session(proxy, f"tools-{stream}")
    assert [m["role"] for m in view["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert view["messages"][1]["finish_reason"] == "tool_calls"
    assert view["messages"][1]["body"]["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]
    assert upstream.chat_requests[-1]["tools"] == tools


def test_n_and_response_format_pass_through(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    reply = client(proxy).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "json please"}], n=2,
        response_format={"type": "json_object"}, temperature=0.3, seed=7, extra_headers={"X-Session-ID": "n2"},
    )
    assert len(reply.choices) == 2
    sent = upstream.chat_requests[-1]
    assert sent["n"] == 2 and sent["response_format"] == {"type": "json_object"} and sent["seed"] == 7
    recorded = admin_session(proxy, "n2")["messages"][-1]
    assert recorded["alternatives"] and len(recorded["alternatives"]) == 1


def test_client_disconnect_mid_stream_records_partial_answer_as_aborted(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    upstream.chunk_delay = 0.2
    upstream.script_reply("one two three four five six seven eight nine ten eleven twelve")
    with httpx.stream(
        "POST", f"{proxy.base_url}/chat/completions", headers={"X-Session-ID": "gone"},
        json={"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "talk"}]},
    ) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    # The proxy notices at its next write, closes the provider stream and records.
    for _ in range(50):
        messages = httpx.get(f"{proxy.url}/admin/sessions/gone").json().get("messages", [])
        if len(messages) == 2:
            break
        import time

        time.sleep(0.1)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["outcome"] == "aborted"
    assert 0 < len(messages[1]["body"]["content"]) < len("one two three four five six seven eight nine ten eleven twelve")


def test_models_embeddings_health(proxy: ProxyThread, upstream: FakeUpstream) -> None:
    sdk = client(proxy)
    assert [m.id for m in sdk.models.list()] == []  # only a "*" route: nothing to list by name
    vectors = sdk.embeddings.create(model="fake-embedding", input=["a", "b"])
    assert len(vectors.data) == 2 and upstream.embedding_requests[-1]["input"] == ["a", "b"]
    assert httpx.get(f"{proxy.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{proxy.url}/ready").status_code == 200


def test_admin_delete_erases_session(proxy: ProxyThread) -> None:
    client(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Session-ID": "doomed"})
    assert httpx.delete(f"{proxy.url}/admin/sessions/doomed").json()["deleted"] is True
    missing = httpx.get(f"{proxy.url}/admin/sessions/doomed")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
    assert httpx.delete(f"{proxy.url}/admin/sessions/doomed").status_code == 404
