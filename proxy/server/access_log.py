"""The access log: one line per request, written by a middleware when the response is done.

Fields: method, route (the route's pattern, so a session id in the path never becomes a new
route), status, tenant, session, upstream status, total / upstream / added milliseconds, tokens
and the request id. Probes (/health, /ready) are logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("agent_state_proxy.access")
_PROBES = frozenset({"/health", "/ready"})


@dataclass
class Access:
    """What the handlers learn about a request, for its access-log line."""

    tenant: str | None = None
    turn: Any = None  # the pipeline's Turn of a chat request


ACCESS = web.RequestKey("access", Access)


def note_tenant(request: web.Request, tenant: str) -> None:
    access = request.get(ACCESS)
    if access is not None:
        access.tenant = tenant


def note_turn(request: web.Request, turn: Any) -> None:
    access = request.get(ACCESS)
    if access is not None:
        access.turn = turn


@web.middleware
async def access_log_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    access = request[ACCESS] = Access()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the response
        raise
    finally:
        _write(request, access, status, (time.perf_counter() - started) * 1000)


def _write(request: web.Request, access: Access, status: int, total_ms: float) -> None:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    level = logging.DEBUG if request.path in _PROBES else logging.INFO
    if not log.isEnabledFor(level):
        return
    turn = access.turn
    fields: dict[str, Any] = {
        "event": "access", "method": request.method, "route": route, "status": status,
        "tenant": access.tenant, "session": request.match_info.get("session_id"),
        "duration_ms": round(total_ms, 2),
    }
    if turn is not None:
        usage = turn.usage or {}
        details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
        fields |= {
            "session": turn.ref.id, "request_id": turn.request_id, "model": turn.route.requested,
            "upstream_status": turn.upstream_status, "upstream_ms": round(turn.upstream_ms, 2),
            "added_ms": round(max(0.0, total_ms - turn.upstream_ms), 2),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": details.get("cached_tokens"),
        }
    log.log(level, "%s %s %d", request.method, route, status, extra={"fields": fields})
