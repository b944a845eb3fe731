"""Parse and render of the Responses edge adapter, on recorded requests and chat streams.

Rendered objects and events are validated with the openai SDK's own pydantic types, so a
shape the SDK would not accept fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import BadRequest
from proxy.protocols import responses, responses_compact
from proxy.protocols.responses_render import StreamRenderer, render

FIXTURES = Path(__file__).parent / "fixtures" / "responses"
EVENTS = TypeAdapter(ResponseStreamEvent)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_codex_request() -> None:
    parsed = responses.parse(fixture("codex_request.json")["body"])
    assert parsed.store is False and parsed.stream is True
    assert parsed.dropped_tools == ["web_search"]
    assert [m["role"] for m in parsed.chat["messages"]] == ["developer", "developer", "user", "user"]
    assert all(isinstance(m["content"], str) for m in parsed.chat["messages"])  # text parts joined: the chat body a chat client sends
    names = [t["function"]["name"] for t in parsed.chat["tools"]]
    assert "exec_command" in names and all(n.startswith("multi_agent_v1__") for n in names if n != "exec_command")
    space, name = parsed.namespaces[names[-1]]
    assert space == "multi_agent_v1" and names[-1] == space + "__" + name
    assert "reasoning_effort" not in parsed.chat  # Codex sent only reasoning.summary
    assert {"include", "prompt_cache_key"} <= parsed.echo.keys()


def test_agents_sdk_request_items_without_type() -> None:
    parsed = responses.parse(fixture("agents_sdk_request.json")["body"])
    messages = parsed.chat["messages"]
    assert messages[0] == {"role": "system", "content": "You answer weather questions."}
    assert messages[1] == {"role": "user", "content": "What's the weather in Lisbon?"}
    assert messages[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lisbon"}'}}]}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_abc", "content": "sunny in Lisbon"}
    assert parsed.chat["tools"][0]["function"]["strict"] is True


def test_assistant_text_and_calls_merge_and_reasoning_is_not_translated() -> None:
    items = [
        {"type": "message", "role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA..."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{}", "namespace": "ns"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
    ]
    messages = responses.items_to_messages(items)
    assert messages[1]["content"] == "Checking." and [c["function"]["name"] for c in messages[1]["tool_calls"]] == ["a", "ns__b"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"] and messages[2]["content"] == "one"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "input": "x", "modalities": ["text"]}, "modalities"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "hologram"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"input": "x"}, "model"),
])
def test_bad_requests_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        responses.parse(body)
    assert caught.value.body()["error"]["param"] == param


def test_hosted_tools_dropped_or_refused() -> None:
    body = {"model": "m", "input": "x", "tools": [{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {}, "strict": False}],
            "tool_choice": {"type": "web_search"}}
    parsed = responses.parse(body)
    assert parsed.dropped_tools == ["web_search"] and parsed.chat["tool_choice"] == "auto" and len(parsed.chat["tools"]) == 1
    with pytest.raises(BadRequest, match="web_search"):
        responses.parse(body, hosted_tools="refuse")


def test_text_stream_renders_the_event_sequence_the_sdk_parses() -> None:
    renderer = StreamRenderer("resp_" + "a" * 32, {"store": True}, "fake-model", 1700000000)
    events = renderer.start()
    for chunk in fixture("chat_streams.json")["text"]:
        events += renderer.feed(chunk)
    events += renderer.finish()
    parsed = [EVENTS.validate_python(e) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    final = parsed[-1].response
    assert parsed[-1].type == "response.completed" and final.output_text == "The weather is fine today."
    deltas = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    assert deltas == final.output_text and final.usage.total_tokens > 0


def test_tool_stream_renders_text_then_function_calls() -> None:
    renderer = StreamRenderer("resp_" + "b" * 32, {}, "fake-model", 1700000000, {"files__read": ("files", "read")})
    events = renderer.start()
    for chunk in fixture("chat_streams.json")["tool"]:
        events += renderer.feed(chunk)
    events += renderer.finish()
    parsed = [EVENTS.validate_python(e) for e in events]
    final = parsed[-1].response
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    assert [item.name for item in final.output[1:]] == ["get_weather", "read"] and final.output[2].namespace == "files"
    added = [e.output_index for e in parsed if e.type == "response.output_item.added"]
    assert added == [0, 1, 2]
    assert json.loads(final.output[1].arguments) == {"city": "Paris"}


def test_failure_mid_stream_is_response_failed() -> None:
    renderer = StreamRenderer("resp_" + "c" * 32, {}, "m", 0)
    events = renderer.start() + renderer.feed(fixture("chat_streams.json")["text"][1]) + renderer.fail(502, "upstream went away")
    last = EVENTS.validate_python(events[-1])
    assert last.type == "response.failed" and last.response.error.message == "upstream went away"
    assert last.response.output[0].status == "completed"  # what arrived is kept


def test_rendered_completion_is_a_valid_response() -> None:
    completion = {"model": "fake-model", "choices": [{"message": {"role": "assistant", "content": "partial"}, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 8}}}
    response = Response.model_validate(render("resp_" + "d" * 32, {"instructions": "i", "metadata": {"a": "b"}}, completion, 1700000000))
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens_details.cached_tokens == 8 and response.instructions == "i"


def test_compaction_item_round_trip() -> None:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "We moved the launch to May 9 because of Berlin."},
                {"role": "assistant", "content": "Understood, May 9 it is."}, {"role": "user", "content": "next"}]
    items, counted = responses_compact.compact(messages, "gpt-4o", "cmp_1")
    assert [i.get("role", i["type"]) for i in items] == ["system", "user", "user", "compaction"]
    assert counted["output"] > 0
    back = responses.items_to_messages([items[-1]])
    assert back[0]["role"] == "assistant" and "May 9" in back[0]["content"]
    assert responses.items_to_messages([{"type": "compaction", "encrypted_content": "gAAAAopaque"}]) == []


def test_hosted_tools_setting_is_validated(tmp_path: Path) -> None:
    from proxy.config import ConfigError, load_config
    from tests.harness import local_config

    path = local_config(tmp_path, "http://127.0.0.1:9/v1", hosted_tools="sometimes")
    with pytest.raises(ConfigError, match=r"local\.yaml: hosted_tools: must be one of drop, refuse"):
        load_config(path)
