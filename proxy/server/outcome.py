"""The outcome of each request, recorded once by one middleware and handed to its observers
(the access log and the metrics): final status, duration, and what the handlers noted.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web


@dataclass
class Outcome:
    """What one request came to. Handlers note the tenant and the turn; the middleware the rest."""

    tenant: str | None = None  # the tenant authentication admitted the request for
    turn: Any = None  # the pipeline's Turn of a chat request
    status: int = 500  # the HTTP status the client got (499: it went away first)
    duration_ms: float = 0.0


OUTCOME = web.RequestKey("outcome", Outcome)
Observer = Callable[[web.Request, Outcome], None]


def note_tenant(request: web.Request, tenant: str) -> None:
    outcome = request.get(OUTCOME)
    if outcome is not None:
        outcome.tenant = tenant


def note_turn(request: web.Request, turn: Any) -> None:
    outcome = request.get(OUTCOME)
    if outcome is not None:
        outcome.turn = turn


def route_pattern(request: web.Request) -> str:
    """The matched route's pattern (a session id in the path never makes a new route)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def outcome_middleware(*observers: Observer):
    """Times every request and tells each observer how it ended, once it has."""

    @web.middleware
    async def record_outcome(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = request[OUTCOME] = Outcome()
        try:
            response = await handler(request)
            outcome.status = response.status
            return response
        except web.HTTPException as exc:
            outcome.status = exc.status
            raise
        except asyncio.CancelledError:
            outcome.status = 499  # the client went away before the response
            raise
        finally:
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            for observe in observers:
                observe(request, outcome)

    return record_outcome
