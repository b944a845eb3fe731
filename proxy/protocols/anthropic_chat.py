"""Anthropic Messages ↔ OpenAI Chat Completions, for upstreams that speak only chat.

Requests: system blocks → system messages, tool_use ↔ tool_calls, tool_result → tool messages,
images → image_url parts. Answers: a chat completion → an Anthropic message, chat chunks → the
Messages event stream. What chat cannot carry (thinking blocks, cache_control, top_k, betas,
unknown fields) is dropped here, with a log line naming it.

Why not litellm's adapter (``litellm/llms/anthropic/messages/adapters``, ~4,800 lines): it takes
only requests that are entirely Anthropic-shaped, while a history restored here may mix turns
recorded through Chat Completions; it is an internal module (it moved from
``experimental_pass_through/adapters`` between releases) that answers in pydantic objects and
routes by litellm model name. The mapping itself is small and is tested here with fixtures.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import orjson

from proxy.protocols.anthropic import INTERRUPTED_TOOL, message_id, split_system

log = logging.getLogger("agent_state_proxy.protocols")

# Messages fields with a Chat Completions equivalent (params key → chat key).
_SAME_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop_sequences": "stop"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use", "content_filter": "refusal"}


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request for a canonical Messages body (``model`` is set by the route)."""
    params = body.get("params") or {}
    system, rest = split_system(body["messages"])
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": _plain_text(system)})
    messages += chat_messages(rest)
    request: dict[str, Any] = {"messages": messages}
    for key, target in _SAME_PARAMS.items():
        if params.get(key) is not None:
            request[target] = params[key]
    tools = [_chat_tool(t) for t in body.get("tools") or ()]
    if any(t is None for t in tools):
        log.info("dropped server tools the chat upstream cannot run: %s", [t.get("name") for t in body["tools"] if _chat_tool(t) is None])
    if tools := [t for t in tools if t is not None]:
        request["tools"] = tools
        if (choice := _tool_choice(params.get("tool_choice"))) is not None:
            request["tool_choice"] = choice
    if body.get("stream"):
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    dropped = sorted(set(params) - set(_SAME_PARAMS) - {"tool_choice"})
    if dropped:
        log.info("fields a chat upstream cannot carry were dropped: %s", ", ".join(dropped))
    return request


def chat_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic-shaped (or already chat-shaped) messages as Chat Completions messages."""
    result: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            result.append({"role": "system", "content": _plain_text(content)})
        elif role == "tool" or not isinstance(content, list):
            result.append(message)
        elif role == "assistant":
            result.append(_chat_assistant(message, content))
        else:
            results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
            for block in results:
                result.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": _tool_result_text(block)})
            parts = [p for p in (_chat_part(b) for b in content if b not in results) if p is not None]
            if parts:
                result.append({"role": "user", "content": parts})
    return _answer_every_call(result)


def _chat_assistant(message: dict[str, Any], content: list[Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        return message
    text = "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    calls = [{"id": b.get("id"), "type": "function", "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
             for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    chat: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        chat["tool_calls"] = calls
    return chat


def _chat_part(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict):
        return None
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    source = block.get("source") or {}
    if kind == "image":
        if source.get("type") == "base64":
            return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
        if source.get("type") == "url":
            return {"type": "image_url", "image_url": {"url": source.get("url")}}
    if kind == "document":
        if source.get("type") == "text":
            return {"type": "text", "text": source.get("data", "")}
        if source.get("type") == "base64":
            return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                             "file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if kind in ("image_url", "file", "input_audio"):
        return block  # a chat part already (a turn recorded through Chat Completions)
    log.info("a %s block cannot be sent to a chat upstream; dropped", kind)
    return None


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    text = _plain_text(content) if content is not None else ""
    return ("Error: " + text) if block.get("is_error") else text


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _answer_every_call(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat providers refuse an assistant tool call without its tool message (an agent that
    stopped mid-tool): add an error result; drop tool messages that answer nothing."""
    result: list[dict[str, Any]] = []
    asked: list[str] = []
    for message in messages:
        if message.get("role") == "tool":
            if message.get("tool_call_id") not in asked:
                log.warning("dropped a tool result that answers no tool call")
                continue
            asked.remove(message["tool_call_id"])
            result.append(message)
            continue
        for missing in asked:
            result.append({"role": "tool", "tool_call_id": missing, "content": INTERRUPTED_TOOL})
        if asked:
            log.warning("repaired %d unanswered tool call(s) with an error result", len(asked))
        asked = [c.get("id") for c in message.get("tool_calls") or ()] if message.get("role") == "assistant" else []
        result.append(message)
    result += [{"role": "tool", "tool_call_id": missing, "content": INTERRUPTED_TOOL} for missing in asked]
    return result


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any] | None:
    if "input_schema" not in tool:
        return None  # a server tool (web search, computer use…): Anthropic runs it, chat cannot
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind)


# -- answers ---------------------------------------------------------------------------------

def message_from_chat(response: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion as an Anthropic message (the first choice; Messages has no ``n``)."""
    choice = (response.get("choices") or [{}])[0] or {}
    chat = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if chat.get("content"):
        content.append({"type": "text", "text": chat["content"]})
    for call in chat.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": _arguments(function.get("arguments"))})
    return {
        "id": message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"), "stop_sequence": None,
        "usage": _usage(response.get("usage")),
    }


def _arguments(arguments: Any) -> dict[str, Any]:
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    return {"input_tokens": int(usage.get("prompt_tokens") or 0), "output_tokens": int(usage.get("completion_tokens") or 0)}


class ChatStreamTranslator:
    """Chat completion chunks in, Messages stream events out, in the order the SDKs expect:
    message_start, per block content_block_start → deltas → content_block_stop, message_delta,
    message_stop."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = False
        self.index = -1  # the open block's index
        self.open: str | None = None  # "text" or the tool call's chat index as "tool:<n>"
        self.stop_reason = "end_turn"
        self.usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._start()
        if isinstance(chunk.get("usage"), dict):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open != "text":
                    events += self._open("text", {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or ():
                key = f"tool:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self.open != key:
                    block = {"type": "tool_use", "id": call.get("id") or f"toolu_{message_id()[4:]}", "name": function.get("name") or "", "input": {}}
                    events += self._open(key, block)
                if function.get("arguments"):
                    events.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
            if choice.get("finish_reason"):
                self.stop_reason = _STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return events

    def finish(self) -> list[dict[str, Any]]:
        events = self._start() + self._close()
        events.append({"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": None}, "usage": self.usage})
        events.append({"type": "message_stop"})
        return events

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        message = {"id": message_id(), "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [{"type": "message_start", "message": message}]

    def _open(self, key: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.index += 1
        self.open = key
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}
