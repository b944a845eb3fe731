"""The rules extractor (proxy/memory/extract_rules.py) and the extractor model's reply parser
(proxy/memory/extract_llm.py): what becomes a memory, with which subject, and bad replies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from proxy.memory import extract_llm
from proxy.memory.extract_rules import from_rules, normal_subject, subject_of, tool_lessons
from proxy.memory.model import PROCEDURAL, SEMANTIC, Memory
from proxy.records import Message


def _message(seq: int, role: str, content: Any = None, **body: Any) -> Message:
    return Message(seq=seq, parent=seq - 1 if seq else None, chain="", role=role, body={"role": role, "content": content} | body, ts=0.0)


@pytest.mark.parametrize(("sentence", "subject"), [
    ("My email is a@b.example.", "user.email"),
    ("my e-mail address is a@b.example", "user.email"),
    ("My favourite colour is teal.", "user.favorite_colour"),
    ("My wife's name is Ana.", "user.wife"),
    ("I moved to Porto in May.", "user.home"),
    ("I now live in Berlin.", "user.home"),
    ("I work at Acme as a welder.", "user.employer"),
    ("Call me Al.", "user.name"),
    ("I'm 41 years old.", "user.age"),
    ("I am allergic to peanuts.", None),  # one more fact, never a replacement
    ("We decided to use Postgres.", None),
    ("Losing my job was hard.", None),  # a past state names no new value
])
def test_subjects_of_sentences(sentence: str, subject: str | None) -> None:
    assert subject_of(sentence) == subject


def test_rules_take_tagged_sentences_of_user_messages_only() -> None:
    messages = [
        _message(0, "user", "Hello! My email is a@b.example. Can you remind me what my email is?"),
        _message(1, "assistant", "I prefer to answer briefly. We decided to use Postgres."),
        _message(2, "user", [{"type": "text", "text": "We decided to use Postgres for billing."}]),
        _message(3, "user", "I love it. Yeah, I remember that!"),
    ]
    found = from_rules(messages)
    assert [(c.text, c.type, c.kind, c.seqs, c.subject) for c in found] == [
        ("My email is a@b.example.", SEMANTIC, "fact", [0], "user.email"),
        ("We decided to use Postgres for billing.", SEMANTIC, "decision", [2], None),
    ]  # not the question, not the assistant's words, not a sentence too short to stand alone


def _call(seq: int, call_id: str, name: str, arguments: str) -> Message:
    return _message(seq, "assistant", None, tool_calls=[{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}])


def test_a_tool_that_failed_then_worked_with_other_arguments_is_a_lesson() -> None:
    messages = [
        _call(0, "a", "query_db", '{"table": "user"}'),
        _message(1, "tool", "ERROR: relation \"user\" does not exist", tool_call_id="a"),
        _call(2, "b", "query_db", '{"table": "users"}'),
        _message(3, "tool", "3 rows", tool_call_id="b"),
        _call(4, "c", "query_db", '{"table": "users"}'),
        _message(5, "tool", "3 rows", tool_call_id="c"),  # success without a failure before: nothing
    ]
    (lesson,) = tool_lessons(messages)
    assert lesson.type == PROCEDURAL and lesson.kind == "lesson" and lesson.seqs == [0, 1, 2, 3]
    assert lesson.text == 'When query_db({"table": "user"}) failed (ERROR: relation "user" does not exist), query_db({"table": "users"}) worked.'
    # The same arguments failing then working is a flake, not a lesson; a failure alone is none.
    assert tool_lessons(messages[:2] + [_call(2, "b", "query_db", '{"table": "user"}'), _message(3, "tool", "ok", tool_call_id="b")]) == []
    assert tool_lessons(messages[:2]) == []
    # The failure may be in the context (an earlier run), the fix in the new messages.
    assert [c.kind for c in from_rules(messages[2:4], context=messages[:2])] == ["lesson"]


def _reply(content: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_the_model_reply_is_validated_item_by_item() -> None:
    content = "```json\n" + json.dumps({"memories": [
        {"type": "semantic", "kind": "fact", "text": "  The user lives\nin Lisbon. ", "subject": "User Home-City", "seqs": [3, 99, True]},
        {"kind": "lesson", "text": "When pip failed, uv worked.", "replaces": "mem_0123"},
        {"kind": "preference", "type": "procedural", "text": "x"},  # too short
        {"kind": "opinion", "type": "weird", "text": "The user has a cat."},  # unknown kind and type: a semantic fact
        "just a string",
    ]}) + "\n```"
    found = extract_llm.parse(_reply(content), [3, 4])
    assert [(c.text, c.type, c.kind, c.seqs, c.subject, c.replaces) for c in found] == [
        ("The user lives in Lisbon.", SEMANTIC, "fact", [3], "user_home_city", None),
        ("When pip failed, uv worked.", PROCEDURAL, "lesson", [3, 4], None, "mem_0123"),
        ("The user has a cat.", SEMANTIC, "fact", [3, 4], None, None),
    ]
    assert extract_llm.parse(_reply('[{"text": "The user likes tea.", "kind": "preference"}]'), [1])[0].type == PROCEDURAL
    assert extract_llm.parse(_reply('{"memories": []}'), [1]) == []


def test_prose_after_the_json_is_not_part_of_it() -> None:
    content = '```json\n{"memories": [{"kind": "fact", "text": "The user lives in Porto."}]}\n```\nI found {1} memory: [Porto].'
    assert [c.text for c in extract_llm.parse(_reply(content), [0])] == ["The user lives in Porto."]


# What Gemma 3 270M (the base model, with the reply held to this JSON shape) answered to a
# conversation about Dana in Lisbon: the answer format's placeholders, copied back.
_COPIED_FORMAT = {"type": "semantic", "kind": "fact", "text": "...", "subject": "...", "replaces": "<id>", "seqs": [1, 2, 3, 4]}


def test_placeholders_of_the_answer_format_name_nothing() -> None:
    assert extract_llm.parse(_reply(json.dumps({"memories": [_COPIED_FORMAT] * 3})), [0, 1]) == []
    found = extract_llm.parse(_reply(json.dumps({"memories": [
        _COPIED_FORMAT | {"text": "The user lives in Porto."},
        {"text": "The user drinks tea.", "subject": "null", "replaces": "None"},
        {"text": "Atlas runs on CockroachDB.", "subject": "Project Database", "replaces": " mem_0123 "},
    ]})), [0, 1])
    # "<id>" would become the subject "id": every memory copying it would replace the one before.
    assert [(c.text, c.subject, c.replaces) for c in found] == [
        ("The user lives in Porto.", None, None), ("The user drinks tea.", None, None),
        ("Atlas runs on CockroachDB.", "project_database", "mem_0123")]


def test_a_reply_cut_off_at_the_token_limit_is_a_bad_reply() -> None:
    whole = '{"memories": [{"kind": "fact", "text": "The user lives in Porto."}]}'
    cut = {"choices": [{"message": {"role": "assistant", "content": whole}, "finish_reason": "length"}]}
    with pytest.raises(extract_llm.BadReply, match="cut off at the token limit"):
        extract_llm.parse(cut, [0])
    assert extract_llm.request("small", [_message(0, "user", "hi")], [])["max_tokens"] == extract_llm.MAX_REPLY_TOKENS


@pytest.mark.parametrize("response", [
    _reply("I could not find anything."), _reply('{"memories": {"text": "x"}}'), _reply("{not json}"), _reply(None),
    {"choices": []}, {"error": "overloaded"}, "text", _reply("[" * 100_000), _reply('{\n    "user": "Dana",\n    "role_id": "us'),
])
def test_a_reply_that_is_not_the_json_asked_for_is_a_bad_reply(response: Any) -> None:
    with pytest.raises(extract_llm.BadReply):
        extract_llm.parse(response, [0])


@given(st.text(max_size=300))
def test_any_reply_text_parses_or_raises_bad_reply(content: str) -> None:
    try:
        extract_llm.parse(_reply(content), [0, 1])
    except extract_llm.BadReply:
        pass


def test_the_request_shows_turns_and_known_memories() -> None:
    known = [Memory(id="mem_aa", type=SEMANTIC, text="The user lives in Lisbon.", ts=0.0, key=0, subject="user.home")]
    window = [_message(0, "user", "I moved to Porto."), _message(1, "tool", "ok", tool_call_id="x"), _message(2, "assistant", "")]
    body = extract_llm.request("small", window, known)
    assert body["model"] == "small" and body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["content"] == extract_llm.PROMPT
    assert body["messages"][1]["content"] == ("Known memories:\n[mem_aa] (user.home) The user lives in Lisbon.\n\n"
                                              "Conversation:\n[0] user: I moved to Porto.\n[1] tool result: ok")


def test_normal_subject() -> None:
    assert normal_subject(" User.Home City! ") == "user.home_city"
    assert normal_subject("") is None and normal_subject(3) is None and normal_subject("!!!") is None
