"""Admin views of learned memories and user erasure (proxy/memory/audit.py, expiry.py); admin
authentication, errors in OpenAI's shape."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest, NotReady
from proxy.memory import audit
from proxy.memory.service import MemoryService
from proxy.server import keys
from proxy.server.http import admin_tenant, json_response


def setup_learning_routes(app: web.Application) -> None:
    app.router.add_get("/admin/memory/extractions", extractions)
    app.router.add_delete("/admin/memory/users/{user_id}", erase_user)


def _service(request: web.Request) -> tuple[MemoryService, str]:
    tenant = admin_tenant(request.app[keys.CONFIG], request)
    service = request.app[keys.PIPELINE].memory
    if tenant.stateless or not tenant.memory.enabled:
        raise BadRequest("long-term memory is disabled for this tenant (memory.enabled, stateless)", code="memory_disabled")
    if service is None or tenant.name not in service.tenants or not service.tenants[tenant.name].ready.is_set():
        raise NotReady("long-term memory is starting; retry shortly")
    return service, tenant.name


def _id(value: str | None, name: str) -> str | None:
    if value is not None and (not value or len(value) > 512 or not value.isprintable()):
        raise BadRequest(f"'{name}' must be a string of 1-512 printable characters", code="invalid_memory", param=name)
    return value


async def extractions(request: web.Request) -> web.Response:
    """?session_id=: the session's extraction runs, their memories and what each request was
    given; ?user_id=: the user's extracted memories, live and superseded."""
    service, tenant = _service(request)
    session = _id(request.query.get("session_id"), "session_id")
    user = _id(request.query.get("user_id"), "user_id")
    if (session is None) == (user is None):
        raise BadRequest("give exactly one of 'session_id' and 'user_id'", code="invalid_memory", param="session_id")
    if session is not None:
        return json_response(await audit.session_view(service, tenant, session))
    assert user is not None
    return json_response(await audit.user_view(service, tenant, user))


async def erase_user(request: web.Request) -> web.Response:
    service, tenant = _service(request)
    user = _id(request.match_info["user_id"], "user_id")
    assert user is not None
    return json_response({"object": "memory.user_erasure"} | await service.learning.forget_user(tenant, user))
