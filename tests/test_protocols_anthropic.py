"""proxy/protocols/anthropic.py and anthropic_chat.py on recorded requests and streams
(tests/fixtures/anthropic: a Claude Code 2.1.197 request, an Anthropic thinking + tool stream,
an OpenAI tool-call stream)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest, NotFound, ProxyError, Unauthorized, UpstreamError
from proxy.protocols import anthropic, anthropic_chat
from proxy.sessions import identify
from proxy.transcript import message_hash

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"


def claude_code_request() -> dict:
    return json.loads((FIXTURES / "claude_code_request.json").read_text())


def recorded_stream() -> list[dict]:
    return [json.loads(line[6:]) for line in (FIXTURES / "stream_thinking_tool.sse").read_text().splitlines() if line.startswith("data: ")]


def test_a_claude_code_request_reaches_an_anthropic_upstream_as_sent() -> None:
    raw = claude_code_request()
    body = anthropic.parse_request(copy.deepcopy(raw))
    assert body["messages"][0] == {"role": "system", "content": raw["system"]}
    assert [m["role"] for m in body["messages"][1:]] == [m["role"] for m in raw["messages"]]  # the mid-conversation system stays
    request, repaired = anthropic.upstream_request(body)
    assert repaired == 0
    assert request == {k: v for k, v in raw.items() if k != "model"}  # every field, unknown ones too, unchanged
    assert request["messages"][0] is body["messages"][1]  # the client's own objects, not re-built copies


def test_claude_code_metadata_names_the_session_and_the_user() -> None:
    raw = claude_code_request()
    ids = json.loads(raw["metadata"]["user_id"])
    ref = identify("t", {}, None, {"messages": raw["messages"], "metadata": raw["metadata"]})
    assert (ref.id, ref.source, ref.implicit) == (ids["session_id"], "claude-code", False)
    assert ref.user_id == ids["device_id"]  # account_uuid is empty when not logged in
    header = identify("t", {"X-Claude-Code-Session-Id": "abc-123"}, None, {"messages": raw["messages"]})
    assert header.id == "abc-123"
    ours = identify("t", {"X-Session-ID": "mine", "X-Claude-Code-Session-Id": "abc-123"}, None, {"messages": raw["messages"], "metadata": raw["metadata"]})
    assert ours.id == "mine"  # the proxy's own header still wins
    plain = identify("t", {}, None, {"messages": [], "metadata": {"user_id": "alice"}})
    assert plain.user_id == "alice" and plain.implicit


@pytest.mark.parametrize(("raw", "words"), [
    ([], "JSON object"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x"}]}]}, "tool_use"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "api_key": "sk-x"}, "api_key"),
])
def test_bad_requests_name_the_field(raw: object, words: str) -> None:
    with pytest.raises(BadRequest) as raised:
        anthropic.parse_request(raw)
    assert words in raised.value.message


def test_the_proxys_session_field_is_not_forwarded() -> None:
    body = anthropic.parse_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "metadata": {"session_id": "s", "user_id": "u"}})
    assert body["params"]["metadata"] == {"user_id": "u"}


def test_an_unanswered_tool_use_gets_an_error_result() -> None:
    call = {"role": "assistant", "content": [{"type": "text", "text": "checking"}, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}
    messages, repaired = anthropic.repair_tool_pairs([{"role": "user", "content": "go"}, call, {"role": "user", "content": "hello again"}])
    assert repaired == 1
    assert messages[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_1", "content": anthropic.INTERRUPTED_TOOL, "is_error": True}
    assert messages[2]["content"][1] == {"type": "text", "text": "hello again"}
    # At the very end (nothing follows) a user turn of results is added.
    messages, repaired = anthropic.repair_tool_pairs([{"role": "user", "content": "go"}, call])
    assert repaired == 1 and messages[-1]["role"] == "user" and messages[-1]["content"][0]["tool_use_id"] == "toolu_1"
    # A result whose call is gone (the context stage cut it) is dropped; a paired history is untouched.
    orphan = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "gone", "content": "x"}, {"type": "text", "text": "hi"}]}
    messages, repaired = anthropic.repair_tool_pairs([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, orphan])
    assert repaired == 1 and messages[-1]["content"] == [{"type": "text", "text": "hi"}]
    paired = [{"role": "user", "content": "go"}, call, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]
    assert anthropic.repair_tool_pairs(paired) == (paired, 0)


def test_turns_recorded_through_chat_completions_continue_in_anthropic_shape() -> None:
    chat_history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "thanks"},
    ]
    request, repaired = anthropic.upstream_request({"messages": chat_history, "params": {"max_tokens": 9}})
    assert repaired == 0 and request["system"] == "be brief"
    assert request["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "42"}]},
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "thanks"},
    ]


def test_a_recorded_stream_rebuilds_the_message_the_sdk_assembles() -> None:
    collector = anthropic.EventCollector(keep_chunks=True)
    for event in recorded_stream():
        collector.add(event)
    [message] = collector.messages()
    assert message["content"] == [
        {"type": "thinking", "thinking": "The user wants the weather. I'll call get_weather.", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+Pw=="},
        {"type": "text", "text": "Let me check the weather."},
        {"type": "tool_use", "id": "toolu_01T1x", "name": "get_weather", "input": {"location": "San Francisco, CA"}},
    ]
    assert collector.finish_reason() == "tool_use" and collector.model == "claude-sonnet-4-5"
    assert collector.usage == {"prompt_tokens": 472 + 2048, "completion_tokens": 89}
    assert len(collector.chunks) == len(recorded_stream())


def test_a_resent_turn_is_the_same_message_when_its_cache_breakpoint_moved() -> None:
    sent = {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
    resent = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    echoed = {"role": "user", "content": [{"type": "text", "text": "hi", "citations": None}]}
    assert message_hash(sent) == message_hash(resent) == message_hash(echoed)
    assert message_hash(resent) != message_hash({"role": "user", "content": [{"type": "text", "text": "hi!"}]})


# -- translation to and from Chat Completions --------------------------------------------------

def test_a_messages_request_as_chat_completions() -> None:
    body = anthropic.parse_request({
        "model": "m", "max_tokens": 64, "stream": True, "stop_sequences": ["END"], "temperature": 0.2, "top_k": 4,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "Rule one.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Rule two."}],
        "tools": [{"name": "f", "description": "does f", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc text"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "calling"},
                                              {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "done"}], "is_error": True},
                                         {"type": "text", "text": "and now?"}]},
        ],
    })
    chat = anthropic_chat.chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Rule one.\n\nRule two."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "doc text"}]},
        {"role": "assistant", "content": "calling", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "Error: done"},
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "does f"}}]
    assert chat["tool_choice"] == "required" and chat["stop"] == ["END"] and chat["temperature"] == 0.2 and chat["max_tokens"] == 64
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert "top_k" not in chat and "thinking" not in chat


def test_a_chat_tool_call_without_its_result_is_answered() -> None:
    body = {"messages": [{"role": "user", "content": "go"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                         {"role": "user", "content": "again"}], "params": {"max_tokens": 5}}
    chat = anthropic_chat.chat_request(body)["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "tool", "user"]
    assert chat[2] == {"role": "tool", "tool_call_id": "t1", "content": anthropic.INTERRUPTED_TOOL}


def test_a_chat_stream_becomes_messages_events_in_order() -> None:
    chunks = [json.loads(line) for line in (FIXTURES / "chat_stream_tools.jsonl").read_text().splitlines()]
    translator = anthropic_chat.ChatStreamTranslator("claude-alias")
    events = [e for chunk in chunks for e in translator.feed(chunk)] + translator.finish()
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert events[0]["message"]["model"] == "claude-alias"
    assert events[-2] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"input_tokens": 57, "output_tokens": 31}}
    collector = anthropic.EventCollector()
    for event in events:
        collector.add(event)
    assert collector.messages()[0]["content"] == [
        {"type": "text", "text": "Checking now."},
        {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "call_def", "name": "get_time", "input": {}},
    ]


def test_a_chat_completion_becomes_a_message() -> None:
    response = {"id": "c1", "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "partial",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":2}"}}]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3}}
    message = anthropic_chat.message_from_chat(response, "alias")
    assert message["content"] == [{"type": "text", "text": "partial"}, {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 2}}]
    assert (message["type"], message["role"], message["model"], message["stop_reason"]) == ("message", "assistant", "alias", "max_tokens")
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 3}


@pytest.mark.parametrize(("error", "kind"), [
    (BadRequest("x"), "invalid_request_error"), (Unauthorized("x"), "authentication_error"), (NotFound("x"), "not_found_error"),
    (ProxyError("x", status=429), "rate_limit_error"), (UpstreamError("x", status=502), "api_error"),
    (UpstreamError("x", status=502, code="overloaded_error"), "overloaded_error"),
])
def test_errors_take_anthropics_shape(error: ProxyError, kind: str) -> None:
    assert anthropic.error_body(error) == {"type": "error", "error": {"type": kind, "message": "x"}}


def test_events_render_as_anthropic_sse() -> None:
    assert anthropic.sse([{"type": "ping"}, {"type": "vendor_extension", "x": 1}]) == (
        b'event: ping\ndata: {"type":"ping"}\n\nevent: vendor_extension\ndata: {"type":"vendor_extension","x":1}\n\n')


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_block = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "thinking", "other"])},
                               optional={"text": _json, "id": _json, "name": _json, "input": _json, "tool_use_id": _json, "source": _json, "content": _json})
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3])},
                                 optional={"content": st.text(max_size=8) | st.lists(_block | _json, max_size=4) | _json})


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({"model": st.just("m") | _json, "max_tokens": st.just(5) | _json, "messages": st.lists(_message, max_size=5) | _json},
                             optional={"system": _json, "tools": _json, "stream": _json, "metadata": _json, "tool_choice": _json}))
def test_untrusted_requests_raise_only_bad_request(raw: dict) -> None:
    try:
        body = anthropic.parse_request(raw)
    except BadRequest:
        return
    # What the parser accepts, both renderers can render.
    anthropic.upstream_request(body)
    anthropic_chat.chat_request(body)


def test_tool_blocks_cost_tokens_like_their_chat_equivalents() -> None:
    from proxy import tokens

    result = "line of a file the tool read\n" * 50
    anthropic_turn = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": result}]}]}
    chat_turn = {"role": "tool", "tool_call_id": "t1", "content": result}
    assert tokens.count_message(anthropic_turn) == tokens.count_message(chat_turn) > 300
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "/src/main.py", "lines": [1, 400]}}]}
    assert tokens.count_message(call) > tokens.count_message({"role": "assistant", "content": []}) + 8
