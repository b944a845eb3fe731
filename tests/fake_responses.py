"""The fake upstream's OpenAI Responses endpoint: `POST /v1/responses`, JSON and SSE.

What an OpenAI upstream that speaks Responses itself answers, so a pass-through (forwarding the
client's Responses request as it is) can be measured against the proxy's translation. It
shares the fake's replies (`script_reply`, `script_tool_call`, the default echo) and usage
rules with the chat endpoint, and is written independently of the proxy's renderer (a fake
must not reuse the code it is used to check). Stateless: `previous_response_id` is ignored.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Iterator

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from tests.fake_upstream import FakeUpstream

_ids = itertools.count(1)


def input_messages(body: dict) -> list[dict]:
    """The Responses input as chat messages, enough for the fake's replies and token counts."""
    messages: list[dict] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    for item in items or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output") or "")})
        elif "role" in item:
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
            messages.append({"role": item["role"], "content": content or ""})
    return messages


def _usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input_tokens + output_tokens}


def _response(response_id: str, body: dict, status: str, output: list[dict], usage: dict | None) -> dict:
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
        "model": body.get("model") or "fake-model", "output": output, "error": None, "incomplete_details": None,
        "usage": usage, "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
        "parallel_tool_calls": True, "temperature": body.get("temperature"), "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [], "top_p": body.get("top_p"), "store": body.get("store", True),
        "previous_response_id": body.get("previous_response_id"), "text": {"format": {"type": "text"}}, "truncation": "disabled",
    }


def _output(response_id: str, message: dict) -> list[dict]:
    items = []
    if message.get("content"):
        items.append({"id": f"msg_{response_id}", "type": "message", "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": message["content"], "annotations": []}]})
    for call in message.get("tool_calls") or ():
        items.append({"id": f"fc_{call['id']}", "type": "function_call", "status": "completed", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
    return items


def _events(response_id: str, body: dict, output: list[dict], usage: dict, pieces: Any) -> Iterator[dict]:
    """The event sequence OpenAI streams, text in word-sized deltas."""
    yield {"type": "response.created", "response": _response(response_id, body, "in_progress", [], None)}
    yield {"type": "response.in_progress", "response": _response(response_id, body, "in_progress", [], None)}
    for index, item in enumerate(output):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield {"type": "response.output_item.added", "output_index": index, "item": item | {"status": "in_progress", "content": []}}
            part = {"type": "output_text", "text": "", "annotations": []}
            yield {"type": "response.content_part.added", **where, "content_index": 0, "part": part}
            for piece in pieces(text):
                yield {"type": "response.output_text.delta", **where, "content_index": 0, "delta": piece, "logprobs": []}
            yield {"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []}
            yield {"type": "response.content_part.done", **where, "content_index": 0, "part": item["content"][0]}
        else:
            yield {"type": "response.output_item.added", "output_index": index, "item": item | {"status": "in_progress", "arguments": ""}}
            yield {"type": "response.function_call_arguments.delta", **where, "delta": item["arguments"]}
            yield {"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"], "name": item["name"]}
        yield {"type": "response.output_item.done", "output_index": index, "item": item}
    yield {"type": "response.completed", "response": _response(response_id, body, "completed", output, usage)}


async def respond(fake: FakeUpstream, request: web.Request) -> web.StreamResponse:
    from tests.fake_upstream import _prompt_tokens, _split_text  # here: fake_upstream imports this module

    body, early = await fake._preamble(request, model_call=True)
    if early is not None:
        return early
    assert isinstance(body, dict)
    if not isinstance(body.get("input"), (str, list)):
        return fake._json_error(400, "'input' is a required property", "invalid_request_error", None)
    chat = {"messages": input_messages(body), "tools": body.get("tools")}
    message = fake._messages_for(chat)[0]
    response_id = f"resp_fake{next(_ids)}"
    output = _output(response_id, message)
    usage = _usage(_prompt_tokens(chat), fake._completion_tokens([message]))
    if not body.get("stream"):
        return web.Response(body=orjson.dumps(_response(response_id, body, "completed", output, usage)), content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for sequence, event in enumerate(_events(response_id, body, output, usage, _split_text)):
        event = {"type": event["type"], "sequence_number": sequence} | event
        await response.write(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
    await response.write_eof()
    return response
