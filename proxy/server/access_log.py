"""The access log: one line per request, from the request's outcome (server/outcome.py).

Fields: method, route (the route's pattern, so a session id in the path never becomes a new
route), status, tenant, session, upstream status, total / upstream / added milliseconds, tokens
and the request id. Probes (/health, /ready) are logged at DEBUG.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

# The handlers' notes live with the outcome; these names stay importable from here.
from proxy.server.outcome import Outcome, note_tenant, note_turn, route_pattern  # noqa: F401

log = logging.getLogger("agent_state_proxy.access")
_PROBES = frozenset({"/health", "/ready"})


def write(request: web.Request, outcome: Outcome) -> None:
    """The request's access-log line (an outcome observer)."""
    level = logging.DEBUG if request.path in _PROBES else logging.INFO
    if not log.isEnabledFor(level):
        return
    route, status, total_ms, turn = route_pattern(request), outcome.status, outcome.duration_ms, outcome.turn
    fields: dict[str, Any] = {
        "event": "access", "method": request.method, "route": route, "status": status,
        "tenant": outcome.tenant, "session": request.match_info.get("session_id"),
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
