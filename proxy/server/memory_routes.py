"""The memories API (/v1/memories...) and the memory admin view; tenant-scoped and authenticated
like every other endpoint, errors in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.config import MemorySettings
from proxy.errors import BadRequest, NotReady
from proxy.memory.model import EPISODIC, PROCEDURAL, SCOPES, SEMANTIC, TYPES, Scope
from proxy.memory.service import MemoryService
from proxy.server import keys
from proxy.server.http import authenticate, json_response, read_json

MAX_CONTENT = 32_000
_ADD_FIELDS = {"content", "type", "user_id", "session_id", "metadata"}
_SEARCH_FIELDS = {"query", "user_id", "session_id", "scope", "top_k", "types", "min_score"}


def setup_memory_routes(app: web.Application) -> None:
    app.router.add_post("/v1/memories", add_memory)
    app.router.add_get("/v1/memories", list_memories)
    app.router.add_post("/v1/memories/search", search_memories)
    app.router.add_get("/v1/memories/{memory_id}", get_memory)
    app.router.add_delete("/v1/memories/{memory_id}", delete_memory)
    app.router.add_get("/admin/memory", admin_memory)


def _service(request: web.Request) -> tuple[MemoryService, str, MemorySettings]:
    tenant = authenticate(request.app[keys.CONFIG], request)
    if not tenant.memory.enabled or tenant.stateless:
        raise BadRequest("long-term memory is disabled for this tenant (memory.enabled, stateless)", code="memory_disabled")
    service = request.app[keys.PIPELINE].memory
    if service is None:  # it starts in the background, right after the proxy begins serving
        raise NotReady("long-term memory is starting; retry shortly")
    settings = service.settings.get(tenant.name)
    if settings is None:  # a tenant that a configuration reload added or gave memory
        raise NotReady("long-term memory of this tenant starts at the proxy's next restart", code="memory_not_started")
    return service, tenant.name, settings


async def add_memory(request: web.Request) -> web.Response:
    service, tenant, _ = _service(request)
    body = _object(await read_json(request, request.app[keys.CONFIG].max_body_bytes), _ADD_FIELDS)
    content = body.get("content")
    if not isinstance(content, str) or not content.strip() or len(content) > MAX_CONTENT:
        raise BadRequest(f"'content' is required and must be a non-empty string of at most {MAX_CONTENT} characters", code="invalid_memory", param="content")
    kind = body.get("type", SEMANTIC)
    if kind == EPISODIC:
        raise BadRequest("'type' must be 'semantic' or 'procedural': episodic memories are recorded from conversations", code="invalid_memory", param="type")
    if kind not in (SEMANTIC, PROCEDURAL):
        raise BadRequest("'type' must be 'semantic' or 'procedural'", code="invalid_memory", param="type")
    user = _id(body.get("user_id", request.headers.get("X-User-ID")), "user_id")
    session = _id(body.get("session_id"), "session_id")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object", code="invalid_memory", param="metadata")
    request.app[keys.QUOTAS].check_new_memory(tenant, service.stats(tenant)["index"]["memories"])
    memory = await service.add(tenant, content.strip(), kind, user, session, metadata)
    return json_response(memory.public())


async def list_memories(request: web.Request) -> web.Response:
    service, tenant, _ = _service(request)
    query = request.query
    kind = query.get("type")
    if kind is not None and kind not in TYPES:
        raise BadRequest(f"'type' must be one of {', '.join(TYPES)}", code="invalid_memory", param="type")
    limit = _int(query.get("limit", "100"), "limit", 1, 1000)
    memories, more = await service.list(
        tenant, type=kind, user=_id(query.get("user_id"), "user_id"), session=_id(query.get("session_id"), "session_id"),
        limit=limit, after=query.get("after"),
    )
    data = [m.public() for m in memories]
    return json_response({"object": "list", "data": data, "has_more": more, "last_id": data[-1]["id"] if data else None})


async def search_memories(request: web.Request) -> web.Response:
    service, tenant, settings = _service(request)
    body = _object(await read_json(request, request.app[keys.CONFIG].max_body_bytes), _SEARCH_FIELDS)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip() or len(query) > MAX_CONTENT:
        raise BadRequest(f"'query' is required and must be a non-empty string of at most {MAX_CONTENT} characters", code="invalid_memory", param="query")
    user = _id(body.get("user_id", request.headers.get("X-User-ID")), "user_id")
    session = _id(body.get("session_id", request.headers.get("X-Session-ID")), "session_id")
    scope_kind = body.get("scope", settings.scope if user is not None else "session")
    if scope_kind not in SCOPES:
        raise BadRequest(f"'scope' must be one of {', '.join(SCOPES)}", code="invalid_memory", param="scope")
    if scope_kind == "user" and user is None:
        raise BadRequest("scope 'user' needs 'user_id' (or the X-User-ID header)", code="invalid_memory", param="user_id")
    if scope_kind == "session" and session is None:
        raise BadRequest("scope 'session' needs 'session_id' (or the X-Session-ID header)", code="invalid_memory", param="session_id")
    top_k = body.get("top_k", settings.top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise BadRequest("'top_k' must be an integer between 1 and 100", code="invalid_memory", param="top_k")
    types = body.get("types", [EPISODIC, SEMANTIC])
    if not isinstance(types, list) or not types or not all(t in TYPES for t in types):
        raise BadRequest(f"'types' must be a non-empty list of {', '.join(TYPES)}", code="invalid_memory", param="types")
    min_score = body.get("min_score")
    if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not -1 <= min_score <= 1):
        raise BadRequest("'min_score' must be a number between -1 and 1", code="invalid_memory", param="min_score")
    results, degraded = await service.search(tenant, query, Scope(scope_kind, user, session), top_k=top_k, types=types,
                                             min_score=float(min_score) if min_score is not None else None)
    data = [m.public() | {"score": round(h.score, 6), "similarity": None if h.cosine is None else round(h.cosine, 4),
                          "lexical": round(h.lexical, 4)} for m, h in results]
    headers = {"X-Memory-Degraded": degraded} if degraded else None
    return json_response({"object": "list", "data": data, "degraded": degraded}, headers=headers)


async def get_memory(request: web.Request) -> web.Response:
    service, tenant, _ = _service(request)
    memory = await service.get(tenant, request.match_info["memory_id"])
    return json_response(memory.public())


async def delete_memory(request: web.Request) -> web.Response:
    service, tenant, _ = _service(request)
    memory_id = request.match_info["memory_id"]
    await service.delete(tenant, memory_id)
    return json_response({"id": memory_id, "object": "memory", "deleted": True})


async def admin_memory(request: web.Request) -> web.Response:
    tenant = authenticate(request.app[keys.CONFIG], request)
    service = request.app[keys.PIPELINE].memory
    stats = service.stats(tenant.name) if service is not None else {"enabled": False}
    return json_response({"tenant": tenant.name, "object": "memory.stats"} | stats)


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unrecognized request argument supplied: '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})", code="invalid_memory", param=unknown[0])
    return body


def _id(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 512 or not value.isprintable():
        raise BadRequest(f"'{name}' must be a string of 1-512 printable characters", code="invalid_memory", param=name)
    return value


def _int(raw: str, name: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer between {low} and {high}", code="invalid_memory", param=name)
    return value
