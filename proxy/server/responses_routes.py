"""The OpenAI Responses API over the chat pipeline: create (JSON and SSE), retrieve, input items, delete.

A request is parsed into the canonical chat body (proxy/protocols/responses.py), runs through
the same pipeline as a chat completion (sessions, reconciliation, context, memory, recording),
and its result is rendered back (proxy/protocols/responses_render.py). A response id is a
tenant-scoped record pointing at the recorded reply: (session, seq). It is written in the
turn's own transaction, durably, before the response completes, so it is readable and
chainable at once and survives a crash. ``previous_response_id`` restores the stored path up
to that message as the history: from the session's head this is a normal turn, from an
earlier response a branch of the transcript tree.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from aiohttp import web

from proxy.config import TenantConfig
from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.pipeline import Pipeline
from proxy.turn import Turn
from proxy.protocols import responses, responses_compact, responses_render as render
from proxy.records import Message
from proxy.server import keys, turns
from proxy.server.http import authenticate, json_response, read_json
from proxy.sessions import SessionRef, user_id_of
from proxy.storage.base import Record
from proxy.transcript import active_path
from proxy.validate import chat_body

log = logging.getLogger("agent_state_proxy.server")
KIND = "response"  # tenant-scoped record: response id → (session, seq) and what the object repeats


def setup_responses_routes(app: web.Application) -> None:
    for prefix in ("", "/s/{session_id}"):
        app.router.add_post(prefix + "/v1/responses", create_response)
        app.router.add_post(prefix + "/v1/responses/compact", compact_response)
        app.router.add_get(prefix + "/v1/responses/{response_id}", retrieve_response)
        app.router.add_delete(prefix + "/v1/responses/{response_id}", delete_response)
        app.router.add_get(prefix + "/v1/responses/{response_id}/input_items", list_input_items)


async def create_response(request: web.Request) -> web.StreamResponse:
    async with turns.admitted(request) as tenant:
        return await _create_response(request, tenant)


async def _create_response(request: web.Request, tenant: TenantConfig) -> web.StreamResponse:
    config, pipeline = request.app[keys.CONFIG], request.app[keys.PIPELINE]
    parsed = responses.parse(await read_json(request, config.max_body_bytes), tenant.hosted_tools)
    headers: dict[str, str] = {}
    if parsed.dropped_tools:
        names = ", ".join(sorted(set(parsed.dropped_tools)))
        log.warning("tenant %s: hosted tools the upstream cannot run were dropped: %s", tenant.name, names)
        headers["Warning"] = f'299 agent-state-proxy "hosted tools dropped (the upstream cannot run them): {names}"'
    chat = parsed.chat | ({"stream": True, "stream_options": {"include_usage": True}} if parsed.stream else {})
    pointer = await _pointer(pipeline, tenant, parsed.previous_response_id, "previous_response_id") if parsed.previous_response_id else None
    if pointer is None:
        ref, chat, route = pipeline.identify(tenant, request.headers, request.match_info.get("session_id"), chat)
        ref = await pipeline.resume(tenant, ref, chat)
    else:
        # A chain never leaves its session (nor its tenant: the pointer is the tenant's own).
        ref = SessionRef(pointer["session"], False, user_id_of(request.headers, chat), "previous_response")
        route = tenant.route(parsed.chat["model"])
        if route is None:
            raise NotFound(f"model '{parsed.chat['model']}' is not configured for this tenant", code="model_not_found")
    async with turns.held(request, tenant, ref):
        if pointer is not None:
            history = await _history(pipeline, tenant, parsed.previous_response_id, pointer)
            chat = chat_body(chat | {"messages": _continue(history, parsed)})
        turn = await turns.prepare(request, tenant, ref, chat, route)
        turn.headers |= headers
        turn.protocol = "responses"
        response_id = "resp_" + uuid.uuid4().hex
        created = int(time.time())
        if turn.replay is not None:  # a retried Idempotency-Key: the recorded answer, rendered again
            return await _replay(request, turn, parsed, response_id, created)
        if parsed.store and not tenant.stateless:
            turn.on_record = _pointer_writer(turn, parsed, response_id, created, route.requested)
        renderer = render.StreamRenderer(response_id, parsed.echo, route.requested, created, parsed.namespaces)
        return await turns.answer(request, turn, parsed.stream,
                                  lambda completion: render.render(response_id, parsed.echo, completion, created, parsed.namespaces),
                                  _ResponsesFrames(renderer))


class _ResponsesFrames:
    """Responses SSE: response.created first, response.completed (or response.failed) last."""

    def __init__(self, renderer: render.StreamRenderer) -> None:
        self.renderer = renderer

    def start(self) -> bytes:
        return render.sse(self.renderer.start())

    def batch(self, batch: list[dict[str, Any]]) -> bytes:
        return render.sse([event for chunk in batch for event in self.renderer.feed(chunk)])

    def end(self) -> bytes:
        return render.sse(self.renderer.finish())

    def fail(self, error: ProxyError) -> bytes:
        return render.sse(self.renderer.fail(error.status, error.message))


async def _replay(request: web.Request, turn: Turn, parsed: responses.ResponsesRequest, response_id: str, created: int) -> web.StreamResponse:
    recorded = turn.replay or {}
    if recorded.get("response") is not None:
        return json_response(render.render(response_id, parsed.echo, recorded["response"], created, parsed.namespaces), headers=turn.headers)
    renderer = render.StreamRenderer(response_id, parsed.echo, parsed.chat["model"], created, parsed.namespaces)
    events = renderer.start()
    for chunk in recorded.get("chunks") or ():
        events += renderer.feed(chunk)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers})
    await response.prepare(request)
    await response.write_eof(render.sse(events + renderer.finish()))
    return response


def _pointer_writer(turn: Turn, parsed: responses.ResponsesRequest, response_id: str, created: int, model: str):
    """The pipeline's on_record hook: the response id's record, in the turn's own transaction."""

    def write(records: list[Message], result: dict[str, Any]) -> list[Record]:
        if result["outcome"] != "ok" or turn.session.head is None:
            return []  # a failed or abandoned response has nothing to chain on
        value = {
            "session": turn.session.id, "seq": turn.session.head, "created_at": created, "model": result.get("model") or model,
            "usage": render.usage(result.get("usage")), "finish_reason": result.get("finish_reason"),
            "echo": parsed.echo, "input": parsed.input_items, "namespaces": {k: list(v) for k, v in parsed.namespaces.items()},
        }
        return [Record(KIND, response_id, value)]

    return write


async def _pointer(pipeline: Pipeline, tenant: TenantConfig, response_id: Any, param: str | None = None) -> dict[str, Any]:
    if not isinstance(response_id, str) or not response_id.startswith("resp_") or len(response_id) > 100:
        raise NotFound(f"Response with id '{response_id}' not found.", param=param)
    found = await pipeline.store.get_record(tenant.name, KIND, response_id) if not tenant.stateless else None
    if found is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param=param)
    return found


async def _history(pipeline: Pipeline, tenant: TenantConfig, response_id: str, pointer: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored path from the session's root to the response's message (404 once erased)."""
    messages = await pipeline.store.get_messages(tenant.name, pointer["session"])
    path = active_path(messages, pointer["seq"])
    if not path or path[-1].seq != pointer["seq"]:
        raise NotFound(f"Response with id '{response_id}' not found (its session was erased).", param="previous_response_id")
    return [m.body for m in path if not m.reverted]


def _continue(history: list[dict[str, Any]], parsed: responses.ResponsesRequest, need_input: bool = True) -> list[dict[str, Any]]:
    """The full history for a chained request: the stored path, then this request's input.

    New ``instructions`` replace the stored leading system message (a differing one makes the
    turn a branch, as on a chat client that edits its system prompt)."""
    new = parsed.chat["messages"]
    if parsed.instructions:
        system, new = new[0], new[1:]
        if history and history[0].get("role") == "system":
            history = [system] + history[1:]
        else:
            history = [system] + history
    if not new and need_input:
        raise BadRequest("'input' must hold at least one item to continue a response", code="invalid_value", param="input")
    return history + new


async def retrieve_response(request: web.Request) -> web.Response:
    tenant, pipeline = authenticate(request.app[keys.CONFIG], request), request.app[keys.PIPELINE]
    response_id = request.match_info["response_id"]
    pointer = await _pointer(pipeline, tenant, response_id)
    history = await _history(pipeline, tenant, response_id, pointer)
    reply = history[-1] if history and history[-1].get("role") == "assistant" else {}
    namespaces = {k: tuple(v) for k, v in (pointer.get("namespaces") or {}).items()}
    result = render.response_object(
        response_id, pointer.get("echo") or {}, pointer.get("model") or "", pointer["created_at"], status="completed",
        output=render.output_items(response_id, reply, namespaces), usage=pointer.get("usage"), finish_reason=pointer.get("finish_reason"),
    )
    result["completed_at"] = pointer["created_at"]
    return json_response(result)


async def delete_response(request: web.Request) -> web.Response:
    """Forget the response id; the session's transcript is the session's (admin API erases it)."""
    tenant, pipeline = authenticate(request.app[keys.CONFIG], request), request.app[keys.PIPELINE]
    response_id = request.match_info["response_id"]
    await _pointer(pipeline, tenant, response_id)
    await pipeline.store.put_records(tenant.name, [Record(KIND, response_id, None)])
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    tenant, pipeline = authenticate(request.app[keys.CONFIG], request), request.app[keys.PIPELINE]
    response_id = request.match_info["response_id"]
    pointer = await _pointer(pipeline, tenant, response_id)
    base = render.item_ids(response_id)
    items = [_input_item(item, f"item_{base}_{i}") for i, item in enumerate(pointer.get("input") or ())]
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be asc or desc", code="invalid_value", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise BadRequest("'limit' must be an integer", code="invalid_value", param="limit") from None
    if not 1 <= limit <= 100:
        raise BadRequest("'limit' must be between 1 and 100", code="invalid_value", param="limit")
    if order == "desc":
        items.reverse()
    if "after" in query:
        ids = [item["id"] for item in items]
        items = items[ids.index(query["after"]) + 1:] if query["after"] in ids else []
    page = items[:limit]
    return json_response({
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit,
    })


def _input_item(item: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    """An input item as the list endpoint shows it: with an id, message content as parts."""
    shown = {"id": fallback_id} | item
    if shown.get("type") == "message":
        shown.setdefault("status", "completed")
        if isinstance(shown.get("content"), str):
            kind = "output_text" if shown.get("role") == "assistant" else "input_text"
            shown["content"] = [{"type": kind, "text": shown["content"]}]
    return shown


async def compact_response(request: web.Request) -> web.Response:
    """Compact a conversation (its input, or a stored chain) into items to continue from.

    Nothing is called upstream and nothing recorded: the client continues from the items
    returned, and its next request records the compacted conversation as a branch.
    """
    config, pipeline = request.app[keys.CONFIG], request.app[keys.PIPELINE]
    tenant = authenticate(config, request)
    parsed = responses.parse(await read_json(request, config.max_body_bytes), tenant.hosted_tools)
    if tenant.route(parsed.chat["model"]) is None:
        raise NotFound(f"model '{parsed.chat['model']}' is not configured for this tenant", code="model_not_found")
    messages = parsed.chat["messages"]
    if parsed.previous_response_id:
        pointer = await _pointer(pipeline, tenant, parsed.previous_response_id, "previous_response_id")
        history = await _history(pipeline, tenant, parsed.previous_response_id, pointer)
        messages = _continue(history, parsed, need_input=False)
    compaction_id = "cmp_" + uuid.uuid4().hex
    items, counted = responses_compact.compact(messages, parsed.chat["model"], compaction_id)
    usage = render.usage({"prompt_tokens": counted["input"], "completion_tokens": counted["output"]})
    return json_response({"id": compaction_id, "object": "response.compaction", "created_at": int(time.time()),
                          "output": items, "usage": usage})
