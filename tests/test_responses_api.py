"""The Responses API through the real proxy, with the official openai SDK, over a chat-completions upstream."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyProcess, local_config, local_proxy, open_tenant, route, start_thread, write_config

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
}


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream):
    """The open local tenant without long-term memory: these tests compare exactly what the
    upstream receives, and recalled memories (an abandoned branch's turns, for one) would add to it."""
    with local_proxy(tmp_path, upstream.base_url, memory={"enabled": False}) as running:
        yield running


def client(proxy, key: str = "any") -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


def sessions(proxy) -> list[dict]:
    return httpx.get(proxy.url + "/admin/sessions").json()["data"]


def session_messages(proxy, session_id: str) -> list[dict]:
    return httpx.get(f"{proxy.url}/admin/sessions/{session_id}").json()["messages"]


def test_create_text_with_instructions(proxy, upstream: FakeUpstream) -> None:
    upstream.script_reply("Hello from the model")
    raw = client(proxy).responses.with_raw_response.create(model="gpt-4o-mini", instructions="Be brief.", input="hi there",
                                                           extra_headers={"X-Session-ID": "text-1"})
    response = raw.parse()
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hello from the model"
    assert response.usage.input_tokens > 0 and response.usage.input_tokens_details.cached_tokens == 0
    assert raw.headers["x-session-id"] == "text-1"
    assert upstream.chat_requests[-1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    assert upstream.chat_requests[-1]["model"] == "gpt-4o-mini"
    recorded = session_messages(proxy, "text-1")
    assert [m["role"] for m in recorded] == ["system", "user", "assistant"]
    assert {m["protocol"] for m in recorded} == {"responses"}  # the admin view tells which protocol recorded them


def test_items_without_type_and_parts(proxy, upstream: FakeUpstream) -> None:
    """What the Agents SDK sends: items with only role and content; developer messages; image parts."""
    upstream.script_reply("seen")
    image = "data:image/png;base64,iVBORw0KGgo="
    client(proxy).responses.create(model="m", input=[
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": image, "detail": "low"}]},
    ])
    sent = upstream.chat_requests[-1]["messages"]
    assert sent[0] == {"role": "developer", "content": "Rules."}
    assert sent[1]["content"] == [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": image, "detail": "low"}}]


def test_function_tool_round_trip(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    upstream.script_tool_call("get_weather", {"city": "Paris"})
    first = api.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    tools_sent = upstream.chat_requests[-1]["tools"]
    assert tools_sent[0]["function"]["name"] == "get_weather" and tools_sent[0]["function"]["strict"] is True
    assert upstream.chat_requests[-1]["parallel_tool_calls"] is False

    upstream.script_reply("It is sunny in Paris.")
    second = api.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER],
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert second.output_text == "It is sunny in Paris."
    sent = upstream.chat_requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21C"}


def test_resent_items_without_previous_id_are_one_session(proxy, upstream: FakeUpstream) -> None:
    """Codex and the Agents SDK resend the whole input each turn: one session, nothing recorded twice."""
    api = client(proxy)
    upstream.script_tool_call("get_weather", {"city": "Oslo"})
    first = api.responses.create(model="m", instructions="You help.", input="Weather in Oslo?", tools=[WEATHER])
    call = first.output[0]
    upstream.script_reply("Cold.")
    items = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "-5C"}]
    second = api.responses.create(model="m", instructions="You help.", input=items, tools=[WEATHER])
    assert second.output_text == "Cold."
    [session] = sessions(proxy)
    roles = [m["role"] for m in session_messages(proxy, session["id"])]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]


def test_structured_output(proxy) -> None:
    class Echo(BaseModel):
        echo: str

    parsed = client(proxy).responses.parse(model="m", input="structured please", text_format=Echo)
    assert parsed.output_parsed == Echo(echo="structured please")


def test_structured_output_json_schema_sent_as_response_format(proxy, upstream: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"], "additionalProperties": False}
    response = client(proxy).responses.create(model="m", input="x", max_output_tokens=50, temperature=0.2, top_p=0.9,
                                              reasoning={"effort": "low"}, metadata={"team": "a"},
                                              text={"format": {"type": "json_schema", "name": "echo", "schema": schema, "strict": True}})
    assert json.loads(response.output_text) == {"echo": "x"}
    assert response.metadata == {"team": "a"} and response.max_output_tokens == 50
    sent = upstream.chat_requests[-1]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "echo", "schema": schema, "strict": True}}
    assert sent["max_completion_tokens"] == 50 and sent["temperature"] == 0.2 and sent["top_p"] == 0.9
    assert sent["reasoning_effort"] == "low" and "metadata" not in sent


def test_stream_events_and_chaining_on_a_streamed_id(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    upstream.script_reply("streamed words here")
    with api.responses.stream(model="m", input="go", extra_headers={"X-Session-ID": "streamy"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") == 3
    assert final.output_text == "streamed words here"
    # Readable and chainable at once: the id was recorded before response.completed was sent.
    assert api.responses.retrieve(final.id).output_text == "streamed words here"
    upstream.script_reply("again")
    api.responses.create(model="m", input="more", previous_response_id=final.id)
    assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == ["go", "streamed words here", "more"]


def test_stream_function_call_events(proxy, upstream: FakeUpstream) -> None:
    upstream.script_tool_call("get_weather", {"city": "Rome"})
    with client(proxy).responses.stream(model="m", input="weather?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output[0].type == "function_call" and json.loads(final.output[0].arguments) == {"city": "Rome"}


def test_stream_failure_mid_way_is_response_failed(proxy, upstream: FakeUpstream) -> None:
    upstream.script_reply("one two three four five six")
    upstream.fail_mid_stream(after_chunks=3)
    with client(proxy).responses.create(model="m", input="x", stream=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created"
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.code == "server_error"


def test_chain_three_deep_then_sigkill_and_chain_again(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = local_config(tmp_path, upstream.base_url)
    proxy = ProxyProcess(config).start()
    try:
        api = client(proxy)
        previous = None
        for index in range(3):
            upstream.script_reply(f"answer {index}")
            previous = api.responses.create(model="m", input=f"question {index}", previous_response_id=previous.id if previous else None)
        proxy.kill()  # SIGKILL: nothing flushed at shutdown
        proxy = ProxyProcess(config, port=proxy.port).start()
        api = client(proxy)
        assert api.responses.retrieve(previous.id).output_text == "answer 2"
        upstream.script_reply("answer 3")
        after = api.responses.create(model="m", input="question 3", previous_response_id=previous.id)
        assert after.output_text == "answer 3"
        contents = [m["content"] for m in upstream.chat_requests[-1]["messages"]]
        assert contents == ["question 0", "answer 0", "question 1", "answer 1", "question 2", "answer 2", "question 3"]
        assert len(sessions(proxy)) == 1
    finally:
        proxy.stop()


def test_branch_from_an_earlier_response(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    upstream.script_reply("A1", "A2", "B2")
    first = api.responses.create(model="m", input="Q1")
    api.responses.create(model="m", input="Q2", previous_response_id=first.id)
    branch = api.responses.create(model="m", input="Q2 instead", previous_response_id=first.id)
    assert branch.output_text == "B2"
    assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == ["Q1", "A1", "Q2 instead"]
    [session] = sessions(proxy)
    messages = session_messages(proxy, session["id"])
    assert [m["body"]["content"] for m in messages] == ["Q1", "A1", "Q2", "A2", "Q2 instead", "B2"]
    assert [m["body"]["content"] for m in messages if m["active"]] == ["Q1", "A1", "Q2 instead", "B2"]


def test_retrieve_input_items_delete(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    upstream.script_reply("done")
    created = api.responses.create(model="m", instructions="sys", input=[{"role": "user", "content": "first"}, {"role": "user", "content": "second"}])
    again = api.responses.retrieve(created.id)
    assert again.id == created.id and again.output_text == "done" and again.instructions == "sys"
    assert again.output[0].id == created.output[0].id
    items = api.responses.input_items.list(created.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["first", "second"]
    assert [i.content[0].text for i in api.responses.input_items.list(created.id).data] == ["second", "first"]
    api.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(created.id)


def test_store_false_keeps_no_response_id(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    response = api.responses.create(model="m", input="ephemeral", store=False)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(response.id)


def test_unknown_previous_response_is_404(proxy) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(proxy).responses.create(model="m", input="x", previous_response_id="resp_doesnotexist")
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "previous_response_id"


def test_another_tenants_response_is_404(keyed_proxy) -> None:
    alpha, beta = client(keyed_proxy, ALPHA_KEY), client(keyed_proxy, BETA_KEY)
    mine = alpha.responses.create(model="m", input="secret plans")
    with pytest.raises(openai.NotFoundError):
        beta.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.create(model="fast", input="x", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.input_items.list(mine.id)
    assert alpha.responses.retrieve(mine.id).output_text == "echo: secret plans"


def test_unknown_field_and_bad_items_are_400(proxy) -> None:
    api = client(proxy)
    with pytest.raises(openai.BadRequestError) as caught:
        api.responses.create(model="m", input="x", extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as caught:
        api.responses.create(model="m", input=[{"type": "computer_call_output", "call_id": "c", "output": {}}])
    assert "computer_call_output" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        api.responses.create(model="m", input="x", extra_body={"api_base": "http://evil"})


def test_hosted_tools_refused_per_tenant(tmp_path: Path, upstream: FakeUpstream) -> None:
    path = local_config(tmp_path, upstream.base_url, hosted_tools="refuse")
    with start_thread(path) as proxy:
        with pytest.raises(openai.BadRequestError) as caught:
            client(proxy).responses.create(model="m", input="x", tools=[{"type": "web_search"}, WEATHER])
        assert "web_search" in caught.value.body["message"]
        assert upstream.chat_requests == []


def test_namespace_tools(proxy, upstream: FakeUpstream) -> None:
    upstream.script_tool_call("files__read", {"path": "a.txt"})
    tools = [{"type": "namespace", "name": "files", "description": "File access",
              "tools": [{"type": "function", "name": "read", "parameters": {"type": "object", "properties": {}}, "strict": False}]}]
    response = client(proxy).responses.create(model="m", input="read a.txt", tools=tools)
    assert upstream.chat_requests[-1]["tools"][0]["function"]["name"] == "files__read"
    call = response.output[0]
    assert (call.namespace, call.name) == ("files", "read")


def test_models_lists_the_model_of_a_catch_all(tmp_path: Path, upstream: FakeUpstream) -> None:
    tenant = open_tenant(upstream.base_url)
    tenant["models"] = {"*": route(upstream.base_url, "openai/served-model"), "fast": route(upstream.base_url, "openai/fake-model")}
    with start_thread(write_config(tmp_path, {"local": tenant})) as proxy:
        assert [m.id for m in client(proxy).models.list()] == ["fast", "openai/served-model"]


def test_compact_then_continue_from_the_compacted_items(proxy, upstream: FakeUpstream) -> None:
    """What Codex does near the context limit: compact, then send the compacted items as its history."""
    api = client(proxy)
    history = [{"role": "developer", "content": "You are a careful agent."},
               {"role": "user", "content": "Our deadline is March 3 and the budget is 4200 EUR."},
               {"role": "assistant", "content": "Noted: deadline March 3, budget 4200 EUR. We decided to use PostgreSQL."},
               {"role": "user", "content": "Now write the plan."}]
    compacted = json.loads(api.responses.with_raw_response.compact(model="m", input=history).text)  # as Codex reads it
    assert compacted["object"] == "response.compaction" and compacted["usage"]["output_tokens"] > 0
    kinds = [(item["type"], item.get("role")) for item in compacted["output"]]
    assert kinds == [("message", "developer"), ("message", "user"), ("message", "user"), ("compaction", None)]
    upstream.script_reply("Here is the plan.")
    items = compacted["output"] + [{"role": "user", "content": "continue"}]
    api.responses.create(model="m", input=items)
    sent = upstream.chat_requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["developer", "user", "user", "assistant", "user"]
    assert "PostgreSQL" in sent[3]["content"] and "4200" in sent[3]["content"]


def test_response_ids_outside_the_critical_set_are_still_readable_at_once(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A tenant that trades durability for latency (response_id not critical): batched, yet chainable at once."""
    tenant = open_tenant(upstream.base_url, persistence={"critical": ["decision"]})
    with start_thread(write_config(tmp_path, {"local": tenant})) as proxy:
        api = client(proxy)
        upstream.script_reply("first", "second")
        first = api.responses.create(model="m", input="one")
        second = api.responses.create(model="m", input="two", previous_response_id=first.id)
        assert api.responses.retrieve(second.id).output_text == "second"
        assert [m["content"] for m in upstream.chat_requests[-1]["messages"]] == ["one", "first", "two"]


def test_idempotent_retry_is_answered_from_the_record(proxy, upstream: FakeUpstream) -> None:
    api = client(proxy)
    upstream.script_reply("only once")
    key = {"Idempotency-Key": "retry-1", "X-Session-ID": "idem"}
    first = api.responses.create(model="m", input="charge the card", extra_headers=key)
    raw = api.responses.with_raw_response.create(model="m", input="charge the card", extra_headers=key)
    assert raw.headers["idempotent-replayed"] == "true"
    assert raw.parse().output_text == first.output_text == "only once"
    assert len(upstream.chat_requests) == 1


def test_models_lists_the_model_given_to_serve_model(tmp_path: Path) -> None:
    """`agent-state-proxy serve --model X` (a catch-all to one model): model pickers see X."""
    from proxy.config import load_config
    from tests.harness import ProxyThread

    config = load_config(None, {"model": "anthropic/claude-3-5-sonnet-20241022", "data_dir": str(tmp_path / "data")})
    with ProxyThread(config) as proxy:
        assert [m.id for m in client(proxy).models.list()] == ["anthropic/claude-3-5-sonnet-20241022"]
