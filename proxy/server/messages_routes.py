"""The Anthropic Messages endpoints (/v1/messages, count_tokens), on the same pipeline as chat.

An Anthropic upstream (a route whose model is ``anthropic/…``) gets the request in its own
protocol, blocks and unknown fields as the client sent them; any other upstream gets it
translated to Chat Completions (proxy/protocols/anthropic_chat.py). Errors on these endpoints
leave in Anthropic's shape.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from proxy import tokens
from proxy.config import ResolvedModel
from proxy.errors import NotFound, PayloadTooLarge, ProxyError
from proxy.pipeline import Pipeline
from proxy.turn import Turn
from proxy.protocols import anthropic, anthropic_chat
from proxy.server import keys
from proxy.server.access_log import note_turn
from proxy.server.http import authenticate, json_response, read_json, store_damaged
from proxy.validate import idempotency_key, request_limits
from proxy.sessions import identify
from proxy.storage.base import StorageError
from proxy.upstream import Upstream, speaks_anthropic

log = logging.getLogger("agent_state_proxy.server")

_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")  # passed unchanged to an Anthropic upstream


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    """The protocol headers an Anthropic upstream gets from the client (betas may come as several lines)."""
    getall = getattr(headers, "getall", None)
    found = {}
    for name in _FORWARDED_HEADERS:
        values = getall(name, []) if getall is not None else ([headers[name]] if name in headers else [])
        if values:
            found[name] = ",".join(values)
    return found


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


class MessagesExchange:
    """The upstream call of one Messages turn: native to an Anthropic upstream, translated otherwise."""

    def __init__(self, route: ResolvedModel, headers: Mapping[str, str]) -> None:
        self.native = speaks_anthropic(route)
        self.headers = _forwarded(headers)

    def _native_request(self, turn: Turn) -> dict[str, Any]:
        request, repaired = anthropic.upstream_request(turn.body)
        if repaired:
            turn.headers["X-Tool-Calls-Repaired"] = str(repaired)
        return request

    async def complete(self, upstream: Upstream, turn: Turn) -> dict[str, Any]:
        timeout = turn.tenant.upstream_timeout
        if self.native:
            return await upstream.anthropic(turn.route, self._native_request(turn), self.headers, timeout)
        response = await upstream.complete(turn.route, anthropic_chat.chat_request(turn.body), timeout)
        return anthropic_chat.message_from_chat(response, turn.route.requested)

    def reply(self, response: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None, str | None]:
        return [anthropic.recorded_message(response)], response.get("stop_reason"), anthropic.pipeline_usage(response.get("usage")), response.get("model")

    async def stream(self, upstream: Upstream, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        timeout = turn.tenant.upstream_timeout
        if self.native:
            events = upstream.anthropic_stream(turn.route, self._native_request(turn), self.headers, timeout)
            async with contextlib.aclosing(events) as batches:
                async for batch in batches:
                    yield batch
            return
        translator = anthropic_chat.ChatStreamTranslator(turn.route.requested)
        chunks = upstream.stream(turn.route, anthropic_chat.chat_request(turn.body), timeout)
        async with contextlib.aclosing(chunks) as batches:
            async for batch in batches:
                translated = [event for chunk in batch for event in translator.feed(chunk)]
                if translated:
                    yield translated
        yield translator.finish()

    def collector(self, keep_chunks: bool) -> anthropic.EventCollector:
        return anthropic.EventCollector(keep_chunks)


@_anthropic_errors
async def messages(request: web.Request) -> web.StreamResponse:
    config, pipeline, quotas = request.app[keys.CONFIG], request.app[keys.PIPELINE], request.app[keys.QUOTAS]
    tenant = authenticate(config, request)
    if (damage := request.app[keys.STORE].damage()) is not None and not tenant.stateless:
        raise store_damaged(damage)
    async with quotas.request(tenant.name):  # rate, concurrency and daily tokens: refused before any work
        raw = await read_json(request, config.max_body_bytes)
        body = anthropic.parse_request(raw)
        request_limits(body, tenant.limits)  # as for chat: one request cannot hold the proxy
        route = _route(tenant, body["model"])
        # Sessions are identified on the client's own view: its messages and its metadata.
        ref = identify(tenant.name, request.headers, request.match_info.get("session_id"), {"messages": body["messages"], "metadata": raw.get("metadata")})
        async with pipeline.session_lock(tenant, ref):
            if not tenant.stateless:
                await quotas.check_new_session(tenant.name, ref.id)
            turn = await pipeline.prepare(tenant, ref, body, route, idempotency_key(request.headers.get("Idempotency-Key")),
                                          exchange=MessagesExchange(route, request.headers))
            note_turn(request, turn)
            if turn.replay is not None:
                return await _replay(request, turn)
            if not body["stream"]:
                answer = await pipeline.complete(turn)
                await quotas.add_tokens(tenant.name, turn.usage)
                return json_response(answer, headers=turn.headers)
            response = await _relay_stream(request, pipeline, turn)
            await quotas.add_tokens(tenant.name, turn.usage)  # after the client has its answer
            return response


def _route(tenant, model: str) -> ResolvedModel:
    route = tenant.route(model)
    if route is None:
        raise NotFound(f"model: {model} is not configured for this tenant")
    return route


async def _relay_stream(request: web.Request, pipeline: Pipeline, turn: Turn) -> web.StreamResponse:
    """SSE relay. Errors before the first event get a normal HTTP error; after, an ``error`` event.

    ``message_stop`` is held back until the turn is recorded, so a client that saw the end of
    the message holds an answer the proxy has accepted.
    """
    batches = pipeline.stream(turn)
    response: web.StreamResponse | None = None
    ending: bytes | None = b""
    try:
        async for batch in batches:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers})
                await response.prepare(request)
            if batch and batch[-1].get("type") == "message_stop":
                ending = anthropic.sse(batch[-1:])
                batch = batch[:-1]
            await response.write(anthropic.sse(batch))
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **turn.headers})
            await response.prepare(request)
    except ProxyError as error:
        if response is None:
            raise
        ending = anthropic.sse([anthropic.error_body(error)])
    except (ConnectionResetError, ConnectionError):
        log.info("client went away mid-stream (session %s, request %s)", turn.ref.id, turn.request_id)
        ending = None
    finally:
        try:
            await batches.aclose()  # records the (possibly partial) response
        except ProxyError as error:
            if response is None:
                raise
            ending = anthropic.sse([anthropic.error_body(error)]) if ending is not None else None
    with contextlib.suppress(ConnectionResetError, ConnectionError):
        await response.write_eof(ending or b"")
    return response


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
        headers = _forwarded(request.headers)
        forwarded = {k: v for k, v in raw.items() if k != "model"}
        result = await request.app[keys.UPSTREAM].anthropic(route, forwarded, headers, tenant.upstream_timeout, path="/messages/count_tokens")
        return json_response(result)
    chat = anthropic_chat.chat_request(body)
    encoding = tokens.encoding_for(route.model)
    count = sum(tokens.count_message(m, encoding) for m in chat["messages"])
    if chat.get("tools"):
        count += tokens.count_text(orjson.dumps(chat["tools"]).decode(), encoding)
    return json_response({"input_tokens": count})
