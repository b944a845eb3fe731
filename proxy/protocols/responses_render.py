"""Render the pipeline's chat results as OpenAI Responses objects and Responses SSE events.

Pure functions of the chat completion (or chat chunks) and the parsed request's echo; item
ids derive from the response id, so a response read back later renders identically.
"""

from __future__ import annotations

from typing import Any

import orjson

# Finish reasons of chat completions that make a response "incomplete", and why.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# ResponseError.code is an enumeration in the SDK: map HTTP failures onto it.
_ERROR_CODES = {429: "rate_limit_exceeded"}
# Request fields a Response object repeats, in the order OpenAI sends them.
_ECHOED = ("instructions", "metadata", "temperature", "top_p", "max_output_tokens", "parallel_tool_calls", "tool_choice", "tools",
           "text", "reasoning", "previous_response_id", "store", "truncation", "prompt_cache_key")
_PREFIXES: dict[str, bytes] = {}  # SSE event type → b"event: <type>\ndata: " (the renderer's few types)


def item_ids(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def output_items(response_id: str, message: dict[str, Any], namespaces: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """The Responses output items of one chat assistant message: its text, then its tool calls."""
    base = item_ids(response_id)
    items: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content or message.get("refusal"):
        parts = [text_part(content)] if content else []
        if message.get("refusal"):
            parts.append({"type": "refusal", "refusal": message["refusal"]})
        items.append({"id": f"msg_{base}_0", "type": "message", "role": "assistant", "status": "completed", "content": parts})
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        items.append(function_call_item(f"fc_{base}_{index}", call.get("id") or f"call_{base}_{index}",
                                        function.get("name") or "", function.get("arguments") or "", "completed", namespaces))
    return items


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str,
                       namespaces: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name, "arguments": arguments}
    space = (namespaces or {}).get(name)  # a namespaced tool's chat name → (namespace, name)
    if space is not None:
        item["namespace"], item["name"] = space
    return item


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = int((chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }


def echoed(echo: dict[str, Any]) -> dict[str, Any]:
    """The request fields a Response object repeats, with the defaults OpenAI shows."""
    return {k: echo.get(k) for k in _ECHOED} | {
        "metadata": echo.get("metadata") or {}, "tools": echo.get("tools") or [],
        "tool_choice": echo.get("tool_choice") or "auto", "parallel_tool_calls": echo.get("parallel_tool_calls", True) is not False,
        "truncation": echo.get("truncation") or "disabled",
    }


def response_object(response_id: str, echo: dict[str, Any], model: str, created_at: float, *, status: str,
                    output: list[dict[str, Any]] | None = None, usage: dict[str, Any] | None = None,
                    finish_reason: str | None = None, error: dict[str, Any] | None = None,
                    repeated: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response object; ``status`` completed turns incomplete when the finish reason says so.

    ``repeated`` is ``echoed(echo)`` made once by a caller that renders several objects of one request."""
    incomplete = None
    if status == "completed" and finish_reason in _INCOMPLETE:
        status, incomplete = "incomplete", {"reason": _INCOMPLETE[finish_reason]}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "model": model,
        "output": output or [], "error": error, "incomplete_details": incomplete, "usage": usage,
        "completed_at": None, "background": False,
    } | (repeated if repeated is not None else echoed(echo))


def render(response_id: str, echo: dict[str, Any], completion: dict[str, Any], created_at: float,
           namespaces: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """A chat completion as a Response object."""
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    result = response_object(response_id, echo, completion.get("model") or "", created_at, status="completed",
                             output=output_items(response_id, message, namespaces), usage=usage(completion.get("usage")),
                             finish_reason=choices[0].get("finish_reason"))
    result["completed_at"] = created_at
    return result


def error_info(status: int, message: str) -> dict[str, Any]:
    return {"code": _ERROR_CODES.get(status, "server_error"), "message": message}


def sse(events: list[dict[str, Any]]) -> bytes:
    """The events as one SSE buffer (one network write per batch).

    Events that carry the same Response object (created and in_progress share their snapshot,
    which repeats the request's tools: ~40 kB for Codex) have it encoded once."""
    parts: list[bytes] = []
    encoded: dict[int, orjson.Fragment] = {}
    for event in events:
        kind = event["type"]
        prefix = _PREFIXES.get(kind)
        if prefix is None:
            prefix = _PREFIXES[kind] = b"event: " + kind.encode() + b"\ndata: "
        response = event.get("response")
        if response is not None:
            fragment = encoded.get(id(response))
            if fragment is None:
                fragment = encoded[id(response)] = orjson.Fragment(orjson.dumps(response))
            event = event | {"response": fragment}  # same key order, same bytes
        parts.append(prefix + orjson.dumps(event) + b"\n\n")
    return b"".join(parts)


class StreamRenderer:
    """Turns chat chunks into the Responses event sequence, numbering every event."""

    def __init__(self, response_id: str, echo: dict[str, Any], model: str, created_at: float,
                 namespaces: dict[str, tuple[str, str]] | None = None) -> None:
        self.id, self.echo, self.model, self.created_at = response_id, echo, model, created_at
        self.namespaces = namespaces
        self.repeated = echoed(echo)  # the same in every Response object of this stream
        self.base = item_ids(response_id)
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # finished items
        self.text: dict[str, Any] | None = None  # the open message item: {"index", "id", "parts"}
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool call index → open function_call item
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def start(self) -> list[dict[str, Any]]:
        snapshot = self._snapshot("in_progress")
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n > 1 has no Responses equivalent: the first choice is the response
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text_delta(delta["content"], events)
            for call in delta.get("tool_calls") or ():
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[dict[str, Any]]:
        """Close what is open and end with response.completed (or incomplete)."""
        events = self._close_all()
        final = self.response("completed")
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return events + [self._event(kind, response=final)]

    def fail(self, status: int, message: str) -> list[dict[str, Any]]:
        """End a started stream with response.failed carrying the error (the protocol's mid-stream error)."""
        events = self._close_all(status="incomplete")
        return events + [self._event("response.failed", response=self.response("failed", error=error_info(status, message)))]

    def response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        result = response_object(self.id, self.echo, self.model, self.created_at, status=status, output=list(self.output),
                                 usage=self.usage, finish_reason=self.finish_reason, error=error, repeated=self.repeated)
        if status == "completed":
            result["completed_at"] = self.created_at
        return result

    # -------------------------------------------------------------------- items

    def _snapshot(self, status: str) -> dict[str, Any]:
        return response_object(self.id, self.echo, self.model, self.created_at, status=status, repeated=self.repeated)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence}
        event.update(fields)
        self.sequence += 1
        return event

    def _text_delta(self, piece: str, events: list[dict[str, Any]]) -> None:
        state = self.text
        if state is None:
            events += self._close_calls()
            index = len(self.output)
            state = self.text = {"index": index, "id": f"msg_{self.base}_{index}", "parts": []}
            item = {"id": state["id"], "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            events.append(self._event("response.output_item.added", output_index=index, item=item))
            events.append(self._event("response.content_part.added", item_id=state["id"], output_index=index,
                                      content_index=0, part=text_part("")))
        state["parts"].append(piece)  # joined once, when the item closes
        # The most frequent event of a stream: built as a literal, not through _event's keywords.
        events.append({"type": "response.output_text.delta", "sequence_number": self.sequence, "item_id": state["id"],
                       "output_index": state["index"], "content_index": 0, "delta": piece, "logprobs": []})
        self.sequence += 1

    def _close_text(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        state, self.text = self.text, None
        text = "".join(state["parts"])
        where = {"item_id": state["id"], "output_index": state["index"], "content_index": 0}
        item = {"id": state["id"], "type": "message", "role": "assistant", "status": "completed", "content": [text_part(text)]}
        self.output.append(item)
        return [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=text_part(text)),
            self._event("response.output_item.done", output_index=state["index"], item=item),
        ]

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        position = call.get("index", 0)
        function = call.get("function") or {}
        state = self.calls.get(position)
        if state is None:
            events += self._close_text()
            index = len(self.output) + len(self.calls)
            item_id = f"fc_{self.base}_{index}"
            name = function.get("name") or ""
            state = {"index": index, "id": item_id, "call_id": call.get("id") or f"call_{self.base}_{index}", "name": name, "arguments": []}
            self.calls[position] = state
            item = function_call_item(item_id, state["call_id"], name, "", "in_progress", self.namespaces)
            events.append(self._event("response.output_item.added", output_index=index, item=item))
        elif function.get("name"):
            state["name"] += function["name"]
        if function.get("arguments"):
            state["arguments"].append(function["arguments"])
            events.append(self._event("response.function_call_arguments.delta", item_id=state["id"], output_index=state["index"],
                                      delta=function["arguments"]))
        return events

    def _close_calls(self, status: str = "completed") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for position in sorted(self.calls):
            state = self.calls[position]
            arguments = "".join(state["arguments"])
            item = function_call_item(state["id"], state["call_id"], state["name"], arguments, status, self.namespaces)
            self.output.append(item)
            events.append(self._event("response.function_call_arguments.done", item_id=state["id"], output_index=state["index"],
                                      arguments=arguments, name=item["name"]))
            events.append(self._event("response.output_item.done", output_index=state["index"], item=item))
        self.calls.clear()
        return events

    def _close_all(self, status: str = "completed") -> list[dict[str, Any]]:
        return self._close_text() + self._close_calls(status)
