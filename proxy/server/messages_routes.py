"""The Anthropic Messages endpoints (/v1/messages, count_tokens), on the same pipeline as chat.

An Anthropic upstream (a route whose model is ``anthropic/…``) gets the request in its own
protocol, blocks and unknown fields as the client sent them; any other upstream gets it
translated to Chat Completions (proxy/protocols/anthropic_chat.py). Errors on these endpoints
leave in Anthropic's shape.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from proxy import tokens
from proxy.config import ResolvedModel
from proxy.errors import NotFound, PayloadTooLarge, ProxyError
from proxy.turn import Turn
from proxy.protocols import anthropic, anthropic_chat
from proxy.protocols.anthropic_exchange import MessagesExchange, forwarded_headers
from proxy.server import keys, turns
from proxy.server.http import authenticate, json_response, read_json
from proxy.validate import request_limits
from proxy.sessions import identify
from proxy.storage.base import StorageError
from proxy.upstream import speaks_anthropic

log = logging.getLogger("agent_state_proxy.server")

def setup_messages_routes(app: web.Application) -> None:
    for prefix in ("", "/s/{session_id}"):
        app.router.add_post(prefix + "/v1/messages", messages)
        app.router.add_post(prefix + "/v1/messages/count_tokens", count_tokens)
    app.router.add_route("HEAD", "/", _alive)  # Claude Code's start-up probe


def _anthropic_errors(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every failure of a Messages endpoint leaves in Anthropic's error shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as error:
            return _error_response(error)
        except StorageError as exc:
            log.critical("storage failure on %s %s: %s", request.method, request.path, exc)
            return _error_response(ProxyError("the proxy could not persist state; nothing was acknowledged", status=503))
        except web.HTTPRequestEntityTooLarge:
            return _error_response(PayloadTooLarge("request body is larger than the configured limit"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_response(ProxyError(exc.reason or "error", status=exc.status))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error (incident %s) on %s %s", incident, request.method, request.path)
            return _error_response(ProxyError(f"internal error (incident {incident})"))

    return wrapped


def _error_response(error: ProxyError) -> web.Response:
    return json_response(anthropic.error_body(error), status=error.status, headers=error.headers)


async def _alive(request: web.Request) -> web.Response:
    return web.Response(status=200)


@_anthropic_errors
async def messages(request: web.Request) -> web.StreamResponse:
    async with turns.admitted(request) as tenant:
        raw = await read_json(request, request.app[keys.CONFIG].max_body_bytes)
        body = anthropic.parse_request(raw)
        request_limits(body, tenant.limits)  # as for chat: one request cannot hold the proxy
        route = _route(tenant, body["model"])
        # Sessions are identified on the client's own view: its messages and its metadata.
        ref = identify(tenant.name, request.headers, request.match_info.get("session_id"), {"messages": body["messages"], "metadata": raw.get("metadata")})
        async with turns.held(request, tenant, ref):
            turn = await turns.prepare(request, tenant, ref, body, route, MessagesExchange(route, request.headers))
            if turn.replay is not None:
                return await _replay(request, turn)
            return await turns.answer(request, turn, body["stream"], lambda answer: answer, _MessagesFrames())


def _route(tenant, model: str) -> ResolvedModel:
    route = tenant.route(model)
    if route is None:
        raise NotFound(f"model: {model} is not configured for this tenant")
    return route


class _MessagesFrames:
    """Messages SSE: the provider's events, its ``message_stop`` held back until the turn is recorded."""

    def __init__(self) -> None:
        self.stop = b""

    def start(self) -> bytes:
        return b""

    def batch(self, batch: list[dict[str, Any]]) -> bytes:
        if batch and batch[-1].get("type") == "message_stop":
            self.stop = anthropic.sse(batch[-1:])
            batch = batch[:-1]
        return anthropic.sse(batch)

    def end(self) -> bytes:
        return self.stop

    def fail(self, error: ProxyError) -> bytes:
        return anthropic.sse([anthropic.error_body(error)])


async def _replay(request: web.Request, turn: Turn) -> web.StreamResponse:
    """Answer a repeated Idempotency-Key with the recorded response, in the form it was asked."""
    recorded = turn.replay or {}
    if recorded.get("response") is not None:
        return json_response(recorded["response"], headers=turn.headers)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers})
    await response.prepare(request)
    await response.write_eof(anthropic.sse(recorded.get("chunks") or ()))
    return response


@_anthropic_errors
async def count_tokens(request: web.Request) -> web.Response:
    """Input tokens of a request: the Anthropic upstream's own count, else a local estimate."""
    config = request.app[keys.CONFIG]
    tenant = authenticate(config, request)
    raw = await read_json(request, config.max_body_bytes)
    body = anthropic.parse_request(raw, count_only=True)
    route = _route(tenant, body["model"])
    if speaks_anthropic(route):
        headers = forwarded_headers(request.headers)
        forwarded = {k: v for k, v in raw.items() if k != "model"}
        result = await request.app[keys.UPSTREAM].anthropic(route, forwarded, headers, tenant.upstream_timeout, path="/messages/count_tokens")
        return json_response(result)
    chat = anthropic_chat.chat_request(body)
    encoding = tokens.encoding_for(route.model)
    count = sum(tokens.count_message(m, encoding) for m in chat["messages"])
    if chat.get("tools"):
        count += tokens.count_text(orjson.dumps(chat["tools"]).decode(), encoding)
    return json_response({"input_tokens": count})
