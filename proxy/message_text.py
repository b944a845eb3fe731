"""The text of a chat message: one set of rules for content parts and tool calls.

Context management reads it (ranking, summaries, tags), memory remembers it and the token
counter prices it. All three see the same parts; they differ only where their jobs do, through
the parameters below.
"""

from __future__ import annotations

from typing import Any

import orjson


def message_text(body: dict[str, Any], *, billed: bool = False, max_arguments: int | None = None) -> str:
    """The text of one message: its content (a string, or the text of each part) and its tool calls.

    Tool calls read as ``called name(arguments); ...``. ``max_arguments`` caps each call's
    arguments (memory: a long argument, e.g. a file a tool writes, would crowd out what was said).
    ``billed``: what the message costs in a prompt rather than what it says: the tool calls as the
    JSON the provider receives, the message's ``name``, and the Anthropic-shaped blocks a
    Claude Code session is mostly made of (tool_use, tool_result, thinking). Those blocks are
    left out of what a message says: a tool's output is not the user's words.
    """
    content = body.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = " ".join(filter(None, (_part_text(p, billed) for p in content if isinstance(p, dict))))
    else:
        text = ""
    calls = body.get("tool_calls")
    if billed:
        if calls:
            text += orjson.dumps(calls).decode()
        if body.get("name"):
            text += " " + str(body["name"])
        return text
    if isinstance(calls, list):
        rendered = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and function.get("name"):
                arguments = str(function.get("arguments") or "")
                rendered.append(f"{function['name']}({arguments[:max_arguments]})")
        if rendered:
            text = (text + " " if text else "") + "called " + "; ".join(rendered)
    return text


def _part_text(part: dict[str, Any], blocks: bool) -> str:
    """A content part's text; with ``blocks``, also the tool call, tool result or thinking an
    Anthropic-shaped block carries."""
    if isinstance(part.get("text"), str):
        return part["text"]
    if not blocks:
        return ""
    kind = part.get("type")
    if kind == "tool_use":
        return f"{part.get('name')} {orjson.dumps(part.get('input')).decode()}"
    if kind == "tool_result":
        inner = part.get("content")
        if isinstance(inner, list):
            return " ".join(filter(None, (_part_text(q, True) for q in inner if isinstance(q, dict))))
        return inner if isinstance(inner, str) else ""
    if kind == "thinking":
        return str(part.get("thinking") or "")
    return ""
