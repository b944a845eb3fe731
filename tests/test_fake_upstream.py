"""Checks that the fake upstream speaks OpenAI well enough for the official SDK to parse it."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fake_upstream import FakeUpstream

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def fake():
    async with FakeUpstream.start() as fake:
        yield fake


@pytest.fixture
async def client(fake):
    # max_retries=0: failures must surface at once, not be retried by the SDK.
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=5) as client:
        yield client


def user(text):
    return [{"role": "user", "content": text}]


async def test_non_streaming_echo(fake, client):
    resp = await client.chat.completions.create(model="m-1", messages=user("hello there"))
    assert fake.base_url.startswith("http://127.0.0.1:") and fake.base_url.endswith("/v1")
    assert resp.object == "chat.completion"
    assert resp.model == "m-1"
    assert resp.choices[0].message.content == "echo: hello there"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == len("hello there") // 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_content_parts_and_json_mode(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "part one"}]}]
    resp = await client.chat.completions.create(model="m", messages=parts, response_format={"type": "json_object"})
    assert json.loads(resp.choices[0].message.content) == {"echo": "part one"}


async def test_streaming_with_usage(client):
    stream = await client.chat.completions.create(
        model="m", messages=user("stream me please"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


async def test_n_choices(client):
    resp = await client.chat.completions.create(model="m", messages=user("hi"), n=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == ["echo: hi", "echo: hi [1]"]


async def test_tool_call_non_streaming(client):
    resp = await client.chat.completions.create(
        model="m", messages=user('CALL_TOOL:get_weather {"city": "Paris"}'), tools=TOOLS
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_call_streaming_scripted(fake, client):
    fake.script_tool_call("get_weather", {"city": "Tokyo, Japan"})
    stream = await client.chat.completions.create(model="m", messages=user("weather?"), tools=TOOLS, stream=True)
    name, args, finish = None, "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Tokyo, Japan"}
    assert finish == "tool_calls"


async def test_scripted_replies_and_responder(fake, client):
    fake.script_reply("first", {"content": "second", "finish_reason": "length"})
    fake.responder = lambda body: f"model={body['model']}"
    r1 = await client.chat.completions.create(model="m", messages=user("a"))
    r2 = await client.chat.completions.create(model="m", messages=user("b"))
    r3 = await client.chat.completions.create(model="m", messages=user("c"))
    assert r1.choices[0].message.content == "first"
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == ("second", "length")
    assert r3.choices[0].message.content == "model=m"


async def test_fail_next_rate_limit(fake, client):
    fake.fail_next(429, "slow down")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="m", messages=user("a"))
    assert info.value.response.headers["retry-after"] == "0"
    assert info.value.body["message"] == "slow down"
    fake.fail_next(503, count=1)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=user("a"))
    ok = await client.chat.completions.create(model="m", messages=user("a"))
    assert ok.choices[0].message.content == "echo: a"


async def test_mid_stream_failure(fake, client):
    fake.fail_mid_stream(after_chunks=2)
    stream = await client.chat.completions.create(model="m", messages=user("one two three four"), stream=True)
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2


async def test_hang_next_times_out(fake):
    fake.hang_next()
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=user("a"))
        # The hang was one-shot: the next call is answered.
        resp = await client.chat.completions.create(model="m", messages=user("b"))
        assert resp.choices[0].message.content == "echo: b"


async def test_embeddings_and_models(client):
    one = await client.embeddings.create(model="e", input="hello")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    many = await client.embeddings.create(model="e", input=["hello", "world"], encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    assert many.data[0].embedding != many.data[1].embedding
    assert many.usage.total_tokens > 0
    models = await client.models.list()
    assert "fake-model" in [m.id for m in models.data]


async def test_request_recording_and_auth():
    async with FakeUpstream.start(expected_api_key="upstream-key") as fake:
        async with AsyncOpenAI(base_url=fake.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="m", messages=user("a"))
        async with AsyncOpenAI(base_url=fake.base_url, api_key="upstream-key", max_retries=0) as good:
            await good.chat.completions.create(model="m", messages=user("b"), temperature=0.5)
        assert fake.auth_headers == ["Bearer wrong", "Bearer upstream-key"]
        assert fake.chat_requests[-1]["temperature"] == 0.5
        assert fake.last_request["path"] == "/v1/chat/completions"
        assert fake.last_request["headers"]["content-type"] == "application/json"
        fake.reset()
        assert fake.requests == [] and fake.chat_requests == []


def test_thread_runner_with_sync_client():
    with FakeUpstream.run_in_thread(chunk_delay=0.001) as fake:
        client = OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=5)
        try:
            fake.fail_next(500, "boom")
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="m", messages=user("a"))
            stream = client.chat.completions.create(model="m", messages=user("sync stream"), stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream)
            assert text == "echo: sync stream"
            fake.hang_next()
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(model="m", messages=user("x"), timeout=0.2)
            assert time.monotonic() - started < 2
        finally:
            client.close()
    # Shutdown released the hung handler; the recorded history survives.
    assert len(fake.chat_requests) == 3


async def test_cached_tokens_are_the_prefix_shared_with_the_previous_request_of_the_cache(client):
    """The prompt-cache truth the proxy's accounting is tested against (fake_upstream.cached_prompt_tokens)."""
    system = {"role": "system", "content": "s" * 400}  # 100 tokens
    first = [system, {"role": "user", "content": "a" * 80}]
    second = first + [{"role": "assistant", "content": "b" * 40}, {"role": "user", "content": "c" * 40}]
    one = await client.chat.completions.create(model="m", messages=first, extra_body={"prompt_cache_key": "k1"})
    assert one.usage.prompt_tokens_details.cached_tokens == 0  # nothing before it
    two = await client.chat.completions.create(model="m", messages=second, extra_body={"prompt_cache_key": "k1"})
    assert two.usage.prompt_tokens == 140 and two.usage.prompt_tokens_details.cached_tokens == 120
    other = await client.chat.completions.create(model="m", messages=second, extra_body={"prompt_cache_key": "k2"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another cache
    # A changed front (the system prompt's last characters) caches only what precedes the change,
    # and the streamed usage chunk says the same.
    edited = [{"role": "system", "content": "s" * 396 + "tttt"}] + second[1:]
    stream = await client.chat.completions.create(model="m", messages=edited, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"prompt_cache_key": "k1"})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 99


async def test_responses_endpoint_json_and_stream_parse_in_the_sdk(fake, client):
    """The fake also speaks Responses (an OpenAI upstream a pass-through would forward to)."""
    response = await client.responses.create(model="m", instructions="be brief", input=[{"role": "user", "content": "hello there"}])
    assert response.status == "completed" and response.output_text == "echo: hello there"
    assert response.usage.input_tokens == len("be briefhello there") // 4 and response.usage.output_tokens > 0
    async with client.responses.stream(model="m", input="one two three") as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4  # "echo: ", "one ", "two ", "three"
    assert final.output_text == "echo: one two three"
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    called = await client.responses.create(model="m", input='CALL_TOOL:get_weather {"city": "Paris"}', tools=tools)
    assert called.output[0].type == "function_call" and json.loads(called.output[0].arguments) == {"city": "Paris"}
    assert fake.requests[-1]["path"] == "/v1/responses"
