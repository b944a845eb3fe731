"""Route handlers: the OpenAI endpoints, health, and the admin session API."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from proxy import checkpoints, rollback
from proxy.context import caching, summaries as context_summaries
from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.pipeline import Pipeline
from proxy.server import keys
from proxy.server.http import authenticate, json_response, read_json
from proxy.sessions import SessionRef
from proxy.transcript import active_path
from proxy.validate import embeddings_body

log = logging.getLogger("agent_state_proxy.server")


def setup_routes(app: web.Application) -> None:
    for prefix in ("", "/s/{session_id}"):
        app.router.add_post(prefix + "/v1/chat/completions", chat_completions)
        app.router.add_get(prefix + "/v1/models", list_models)
        app.router.add_post(prefix + "/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/admin/sessions", admin_list_sessions)
    app.router.add_get("/admin/sessions/{session_id}", admin_get_session)
    app.router.add_delete("/admin/sessions/{session_id}", admin_delete_session)
    app.router.add_get("/admin/sessions/{session_id}/checkpoints", admin_checkpoints)
    app.router.add_post("/admin/sessions/{session_id}/rollback", admin_rollback)
    app.router.add_post("/admin/sessions/{session_id}/fork", admin_fork)
    app.router.add_get("/admin/recovery", admin_recovery)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config, pipeline = request.app[keys.CONFIG], request.app[keys.PIPELINE]
    tenant = authenticate(config, request)
    body = await read_json(request, config.max_body_bytes)
    ref, body, route = pipeline.identify(tenant, request.headers, request.match_info.get("session_id"), body)
    async with pipeline.session_lock(tenant, ref):
        turn = await pipeline.prepare(tenant, ref, body, route, request.headers.get("Idempotency-Key"))
        if turn.replay is not None:
            return await _replay(request, turn)
        if not body.get("stream"):
            response = await pipeline.complete(turn)
            return json_response(response, headers=turn.headers)
        return await _relay_stream(request, pipeline, turn)


async def _relay_stream(request: web.Request, pipeline: Pipeline, turn) -> web.StreamResponse:
    """SSE relay. Errors before the first chunk get a normal HTTP error; after, an error event.

    The stream ends ([DONE] and the end of the body, in one send) only once the turn is recorded,
    so a client that saw [DONE] holds an answer the proxy has accepted; if recording fails the
    stream ends with an error event instead.
    """
    batches = pipeline.stream(turn)
    response: web.StreamResponse | None = None
    ending: bytes | None = b"data: [DONE]\n\n"
    try:
        async for batch in batches:
            if response is None:
                response = web.StreamResponse(headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers,
                })
                await response.prepare(request)
            await response.write(_events(batch))  # one send for what arrived together
        if response is None:  # the provider sent no chunk at all: still a well-formed stream
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **turn.headers})
            await response.prepare(request)
    except ProxyError as error:
        if response is None:
            raise
        ending = _events([error.body()])
    except (ConnectionResetError, ConnectionError):
        log.info("client went away mid-stream (session %s, request %s)", turn.ref.id, turn.request_id)
        ending = None
    finally:
        try:
            await batches.aclose()  # records the (possibly partial) response
        except ProxyError as error:
            if response is None:
                raise
            ending = _events([error.body()]) if ending is not None else None
    if response is not None:
        await _end_quietly(response, ending)
    return response


async def _replay(request: web.Request, turn) -> web.StreamResponse:
    """Answer a repeated Idempotency-Key with the recorded response, in the form it was asked."""
    recorded = turn.replay
    if recorded.get("response") is not None:
        return json_response(recorded["response"], headers=turn.headers)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **turn.headers})
    await response.prepare(request)
    await response.write(_events(recorded.get("chunks") or ()) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _events(chunks) -> bytes:
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)


async def _end_quietly(response: web.StreamResponse, last: bytes | None) -> None:
    try:
        await response.write_eof(last or b"")
    except (ConnectionResetError, ConnectionError):
        pass


async def list_models(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    created = int(request.app[keys.STARTED])
    data = [{"id": alias, "object": "model", "created": created, "owned_by": tenant.name} for alias in tenant.models if alias != "*"]
    return json_response({"object": "list", "data": data})


async def embeddings(request: web.Request) -> web.Response:
    config = request.app[keys.CONFIG]
    tenant = authenticate(config, request)
    body = embeddings_body(await read_json(request, config.max_body_bytes))
    route = tenant.route(body["model"])
    if route is None:
        raise NotFound(f"model '{body['model']}' is not configured for this tenant", code="model_not_found")
    result = await request.app[keys.UPSTREAM].embeddings(route, body, tenant.upstream_timeout)
    return json_response(result)


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    if not request.app[keys.READY]:
        return json_response({"status": "starting"}, status=503)
    return json_response({"status": "ready", "uptime_seconds": round(time.time() - request.app[keys.STARTED], 1)})


async def admin_list_sessions(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    sessions = await request.app[keys.STORE].list_sessions(tenant.name)
    # cache: the tenant's prompt, cached and compaction-saved tokens over its stored sessions
    return json_response({"object": "list", "data": [s.to_dict() for s in sessions], "cache": caching.tenant_totals(sessions)})


async def admin_get_session(request: web.Request) -> web.Response:
    tenant, store, session = await _session_for_admin(request)
    session_id = session.id
    messages = await store.get_messages(tenant.name, session_id)
    active = {m.seq for m in active_path(messages, session.head)}
    return json_response({
        "session": session.to_dict(),
        "messages": [m.to_dict() | {"active": m.seq in active} for m in messages],
        "summaries": await context_summaries.for_admin(store, tenant.name, session_id),  # with the seqs each covers
    })


async def admin_delete_session(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    session_id = request.match_info["session_id"]
    ref = SessionRef(session_id, False, None, "admin")
    pipeline = request.app[keys.PIPELINE]
    async with pipeline.locks.hold(tenant.name, ref.id, refuse_when_busy=False):
        deleted = await request.app[keys.STORE].delete_session(tenant.name, session_id)
    if pipeline.memory is not None:
        await pipeline.memory.forget_session(tenant.name, session_id)  # LMDB erased them with the session
    if not deleted:
        raise NotFound(f"no session '{session_id}' for this tenant", code="session_not_found")
    return json_response({"id": session_id, "object": "session", "deleted": True})




async def _session_for_admin(request: web.Request):
    tenant = authenticate(request.app[keys.CONFIG], request)
    store, session_id = request.app[keys.STORE], request.match_info["session_id"]
    session = await store.get_session(tenant.name, session_id)
    if session is None:
        raise NotFound(f"no session '{session_id}' for this tenant", code="session_not_found")
    return tenant, store, session


async def admin_checkpoints(request: web.Request) -> web.Response:
    _, store, session = await _session_for_admin(request)
    found = await store.scan_records(session.tenant, checkpoints.KIND, session.id)
    data = [{"id": key, "seq": value.get("seq"), "ts": value.get("ts"), "head": (value.get("session") or {}).get("head"),
             "valid": checkpoints.problem(value) is None} for key, value in found]
    return json_response({"object": "list", "data": data})


async def admin_rollback(request: web.Request) -> web.Response:
    tenant, store, session = await _session_for_admin(request)
    spec = await read_json(request, request.app[keys.CONFIG].max_body_bytes)
    if not isinstance(spec, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    async with request.app[keys.PIPELINE].locks.hold(tenant.name, session.id, refuse_when_busy=False):
        session = await store.get_session(tenant.name, session.id) or session
        messages = await store.get_messages(tenant.name, session.id)
        report = await rollback.rollback(store, session, messages, spec, time.time())
    memory = request.app[keys.PIPELINE].memory
    if memory is not None:  # reverted turns leave long-term memory too
        await memory.forget_messages(tenant.name, session.id, report["reverted"])
    return json_response(report)


async def admin_fork(request: web.Request) -> web.Response:
    tenant, store, session = await _session_for_admin(request)
    spec = await read_json(request, request.app[keys.CONFIG].max_body_bytes) if request.can_read_body else {}
    if not isinstance(spec, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    async with request.app[keys.PIPELINE].locks.hold(tenant.name, session.id, refuse_when_busy=False):
        messages = await store.get_messages(tenant.name, session.id)
        forked = await rollback.fork(store, session, messages, spec, time.time())
    return json_response({"id": forked.id, "object": "session", "source": session.id, "messages": forked.next_seq}, status=201)


async def admin_recovery(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    store = request.app[keys.STORE]
    quarantined = [dataclasses.asdict(q) for q in await store.quarantined(tenant.name)]
    return json_response({"quarantined": quarantined, "store": store.stats(), "repaired_sessions": request.app[keys.PIPELINE].repaired})
