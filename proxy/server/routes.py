"""Route handlers: the OpenAI endpoints, health, and the admin session API."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from proxy import checkpoints
from proxy.context import caching, summaries as context_summaries
from proxy.errors import BadRequest, Conflict, NotFound, ProxyError
from proxy.protocols.anthropic_chat import chat_messages
from proxy.server import keys, pages, turns
from proxy.server.http import admin_tenant, authenticate, is_operator, json_response, read_json
from proxy.storage.base import REPAIR_HINT, Record
from proxy.transcript import walk
from proxy.pacing import Pace
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
    app.router.add_post("/admin/sessions/{session_id}/checkpoints", admin_create_checkpoint)
    app.router.add_post("/admin/sessions/{session_id}/rollback", admin_rollback)
    app.router.add_post("/admin/sessions/{session_id}/fork", admin_fork)
    app.router.add_get("/admin/recovery", admin_recovery)
    app.router.add_get("/admin/usage", admin_usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    async with turns.admitted(request) as tenant:
        config, pipeline = request.app[keys.CONFIG], request.app[keys.PIPELINE]
        body = await read_json(request, config.max_body_bytes, tenant.limits.max_messages)
        ref, body, route = pipeline.identify(tenant, request.headers, request.match_info.get("session_id"), body)
        ref = await pipeline.resume(tenant, ref, body)
        async with turns.held(request, tenant, ref):
            turn = await turns.prepare(request, tenant, ref, body, route)
            if turn.replay is not None:
                return await _replay(request, turn)
            if turn.plan.restored:  # restored turns may have been recorded through another protocol
                turn.body = turn.body | {"messages": chat_messages(turn.body["messages"])}
            return await turns.answer(request, turn, bool(body.get("stream")), lambda response: response, _ChatFrames())


class _ChatFrames:
    """Chat Completions SSE: ``data: {chunk}`` events, ``data: [DONE]`` at the end."""

    def start(self) -> bytes:
        return b""

    def batch(self, batch: list[dict[str, Any]]) -> bytes:
        return _events(batch)

    def end(self) -> bytes:
        return b"data: [DONE]\n\n"

    def fail(self, error: ProxyError) -> bytes:
        return _events([error.body()])


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


async def list_models(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    created = int(request.app[keys.STARTED])
    names = [alias for alias in tenant.models if alias != "*"]
    catch_all = tenant.models.get("*")
    if catch_all is not None and "{model}" not in catch_all.model and catch_all.model not in names:
        # A catch-all to one model (`serve --model X`): list that model, like `litellm --model`.
        names.append(catch_all.model)
    data = [{"id": name, "object": "model", "created": created, "owned_by": tenant.name} for name in names]
    return json_response({"object": "list", "data": data})


async def embeddings(request: web.Request) -> web.Response:
    config, quotas = request.app[keys.CONFIG], request.app[keys.QUOTAS]
    tenant = authenticate(config, request)
    async with quotas.request(tenant.name):
        body = embeddings_body(await read_json(request, config.max_body_bytes), tenant.passthrough_fields)
        route = tenant.route(body["model"])
        if route is None:
            raise NotFound(f"model '{body['model']}' is not configured for this tenant", code="model_not_found")
        result = await request.app[keys.UPSTREAM].embeddings(route, body, tenant.upstream_timeout)
        await quotas.add_tokens(tenant.name, result.get("usage"))
    return json_response(result)


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    if not request.app[keys.READY]:
        return json_response({"status": "starting"}, status=503)
    damage = request.app[keys.STORE].damage()
    if damage is not None:
        # A replica that cannot read its store must leave the load balancer's rotation.
        return json_response({"status": "store_damaged", "reason": damage, "run": REPAIR_HINT}, status=503)
    problem = request.app[keys.STORE].health()
    if problem is None:  # a database server (PostgreSQL) may go away while nothing is written
        probe = getattr(request.app[keys.STORE].inner, "readiness", None)
        problem = await probe() if probe is not None else None
    if problem is not None:  # a replica that cannot record turns must not take traffic
        return json_response({"status": "unavailable", "reason": problem}, status=503)
    return json_response({"status": "ready", "uptime_seconds": round(time.time() - request.app[keys.STARTED], 1)})


async def admin_list_sessions(request: web.Request) -> web.Response:
    """One page of the tenant's sessions, most recently active first (``limit``, ``after``, ``user_id``)."""
    tenant = admin_tenant(request.app[keys.CONFIG], request)
    query = request.query
    limit = pages.limit(query.get("limit"))
    after = pages.decode_cursor(query["after"]) if "after" in query else None
    user_id = query.get("user_id")
    sessions = await request.app[keys.STORE].list_sessions(tenant.name)
    if user_id is not None:
        sessions = [s for s in sessions if s.user_id == user_id]
    page, next_cursor = pages.newest_first(sessions, limit, after)
    return json_response({"object": "list", "data": [s.to_dict() for s in page], "has_more": next_cursor is not None,
                          "next_cursor": next_cursor,
                          # the tenant's prompt, cached and compaction-saved tokens over its stored sessions
                          "cache": caching.tenant_totals(sessions)})


async def admin_get_session(request: web.Request) -> web.Response:
    tenant, store, session = await _session_for_admin(request)
    session_id = session.id
    messages = await store.get_messages(tenant.name, session_id)
    path, gaps = walk([m for m in messages if not m.reverted], session.head)
    active = {m.seq for m in path}
    after_gap = {gap.before for gap in gaps}
    shown, pace = [], Pace()  # a session of thousands of messages: converted in slices
    for m in messages:
        shown.append(m.to_dict() | {"active": m.seq in active} | ({"gap_before": True} if m.seq in after_gap else {}))
        await pace.tick()
    return json_response({
        "session": session.to_dict(),
        "messages": shown,
        "gaps": [gap.to_dict() for gap in gaps],  # lost (quarantined) messages inside the active path
        "summaries": await context_summaries.for_admin(store, tenant.name, session_id),  # with the seqs each covers
    })


async def admin_delete_session(request: web.Request) -> web.Response:
    tenant = admin_tenant(request.app[keys.CONFIG], request)
    session_id = request.match_info["session_id"]
    if not await request.app[keys.PIPELINE].lifecycle.delete(tenant.name, session_id):
        raise NotFound(f"no session '{session_id}' for this tenant", code="session_not_found")
    return json_response({"id": session_id, "object": "session", "deleted": True})


async def _session_for_admin(request: web.Request):
    tenant = admin_tenant(request.app[keys.CONFIG], request)
    store, session_id = request.app[keys.STORE], request.match_info["session_id"]
    session = await store.get_session(tenant.name, session_id)
    if session is None:
        raise NotFound(f"no session '{session_id}' for this tenant", code="session_not_found")
    return tenant, store, session


async def admin_checkpoints(request: web.Request) -> web.Response:
    _, store, session = await _session_for_admin(request)
    found = await store.scan_records(session.tenant, checkpoints.KIND, session.id)
    data = [{"id": key, "name": value.get("name"), "seq": value.get("seq"), "ts": value.get("ts"),
             "head": (value.get("session") or {}).get("head"), "valid": checkpoints.problem(value) is None} for key, value in found]
    return json_response({"object": "list", "data": data})


async def admin_create_checkpoint(request: web.Request) -> web.Response:
    """A named checkpoint now (e.g. before a risky step), to roll back to by name later."""
    tenant, store, session = await _session_for_admin(request)
    spec = await read_json(request, request.app[keys.CONFIG].max_body_bytes)
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
        raise BadRequest("'name' must be a printable string of 1-128 characters", code="invalid_checkpoint", param="name")
    async with request.app[keys.PIPELINE].hold(tenant.name, session.id, refuse_when_busy=False):
        session = await store.get_session(tenant.name, session.id) or session
        taken = session.extra.get(checkpoints.NAMED, {})
        if name in taken:
            raise Conflict(f"the session already has a checkpoint named '{name}'", code="checkpoint_exists")
        if len(taken) >= checkpoints.MAX_NAMED:
            raise BadRequest(f"a session keeps at most {checkpoints.MAX_NAMED} named checkpoints", code="too_many_checkpoints")
        messages = await store.get_messages(tenant.name, session.id)
        key, value = checkpoints.named(session, messages, name, time.time())
        await store.commit(session, [], [Record(checkpoints.KIND, key, value, session.id)])
    return json_response({"id": key, "name": name, "seq": value["seq"], "head": session.head, "object": "checkpoint"}, status=201)


async def admin_rollback(request: web.Request) -> web.Response:
    tenant, _, session = await _session_for_admin(request)
    spec = await read_json(request, request.app[keys.CONFIG].max_body_bytes)
    if not isinstance(spec, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    return json_response(await request.app[keys.PIPELINE].lifecycle.rollback(tenant.name, session.id, spec, time.time()))


async def admin_fork(request: web.Request) -> web.Response:
    tenant, _, session = await _session_for_admin(request)
    spec = await read_json(request, request.app[keys.CONFIG].max_body_bytes) if request.can_read_body else {}
    if not isinstance(spec, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    quotas = request.app[keys.QUOTAS]
    source, forked = await request.app[keys.PIPELINE].lifecycle.fork(
        tenant.name, session.id, spec, time.time(), admit=lambda new_id: quotas.check_new_session(tenant.name, new_id))
    kept = forked.head + 1 if forked.head is not None else 0  # the rest came along reverted
    return json_response({"id": forked.id, "object": "session", "source": source.id, "messages": kept}, status=201)


async def admin_recovery(request: web.Request) -> web.Response:
    """The tenant's quarantined records and repaired sessions; with an operator key, every
    tenant's plus the store's own figures (its path, size, queue), which no tenant sees."""
    config, store, pipeline = request.app[keys.CONFIG], request.app[keys.STORE], request.app[keys.PIPELINE]
    if is_operator(config, request):
        quarantined = [dataclasses.asdict(q) for q in await store.quarantined(None)]
        return json_response({"quarantined": quarantined, "repaired_sessions": pipeline.repaired, "store": store.stats()})
    tenant = authenticate(config, request)
    quarantined = [dataclasses.asdict(q) for q in await store.quarantined(tenant.name)]
    repaired = [r for r in pipeline.repaired if r["tenant"] == tenant.name]
    return json_response({"quarantined": quarantined, "repaired_sessions": repaired})


async def admin_usage(request: web.Request) -> web.Response:
    """The tenant's use of each quota and how often each refused it; every tenant's for an operator."""
    config, quotas = request.app[keys.CONFIG], request.app[keys.QUOTAS]
    if is_operator(config, request):
        return json_response({"object": "list", "data": [await quotas.usage(name) for name in config.tenants]})
    return json_response(await quotas.usage(authenticate(config, request).name))
