"""One set of rules for the text of a message: context reads it, memory remembers it, tokens price it."""

from __future__ import annotations

import orjson

from proxy import tokens
from proxy.context.units import text_of
from proxy.memory.model import message_text as remembered
from proxy.message_text import message_text

PARTS = {"role": "user", "content": [
    {"type": "text", "text": "Deploy on Friday."},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_text", "text": "Not on Monday."},
    {"type": "output_text", "text": "Noted."},
]}
CALLS = {"role": "assistant", "content": "Checking.", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "rotation"}'}},
    {"id": "c2", "type": "function", "function": {"name": "write_file", "arguments": "x" * 2000}},
]}
BLOCKS = {"role": "user", "content": [
    {"type": "text", "text": "Here is the file."},
    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "line one"}]},
    {"type": "thinking", "thinking": "hmm"},
    {"type": "tool_use", "id": "t2", "name": "read", "input": {"path": "/a"}},
]}


def test_every_reader_takes_the_same_parts_of_the_content() -> None:
    said = "Deploy on Friday. Not on Monday. Noted."
    assert message_text(PARTS) == text_of(PARTS) == remembered(PARTS) == message_text(PARTS, billed=True) == said


def test_tool_calls_read_as_calls_and_memory_caps_their_arguments() -> None:
    assert text_of(CALLS) == f'Checking. called lookup({{"q": "rotation"}}); write_file({"x" * 2000})'
    assert remembered(CALLS) == f'Checking. called lookup({{"q": "rotation"}}); write_file({"x" * 500})'
    assert text_of({"role": "assistant", "content": None, "tool_calls": CALLS["tool_calls"][:1]}) == 'called lookup({"q": "rotation"})'


def test_the_billed_text_is_what_the_provider_receives() -> None:
    assert message_text(CALLS, billed=True) == "Checking." + orjson.dumps(CALLS["tool_calls"]).decode()
    assert message_text({"role": "tool", "name": "lookup", "content": "42"}, billed=True) == "42 lookup"
    assert message_text(BLOCKS, billed=True) == 'Here is the file. line one hmm read {"path":"/a"}'
    assert tokens.count_message(BLOCKS) == tokens.count_text(message_text(BLOCKS, billed=True)) + tokens.count_message({"role": "user", "content": ""})


def test_anthropic_blocks_are_not_what_a_message_says() -> None:
    """A tool's output in a user turn is not the user's words: not remembered, not ranked."""
    assert text_of(BLOCKS) == remembered(BLOCKS) == "Here is the file."
