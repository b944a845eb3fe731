"""What every protocol's turn route does around its own parsing and rendering, in one place: the
tenant admitted (authenticated, its store not damaged, inside its quotas), the session held,
the turn prepared, and the provider's answer given whole or streamed.

A route reads as: admitted → parse and identify (the protocol's own) → held → prepare → replay
or answer (rendered by the protocol)."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from proxy.config import ResolvedModel, TenantConfig
from proxy.server import keys
from proxy.server.outcome import note_turn
from proxy.server.http import authenticate, json_response, refuse_if_damaged
from proxy.server.relay import Frames, relay
from proxy.sessions import SessionRef
from proxy.turn import Exchange, Turn
from proxy.validate import idempotency_key


@contextlib.asynccontextmanager
async def admitted(request: web.Request) -> AsyncIterator[TenantConfig]:
    """The request's tenant, inside its rate, concurrency and daily-token quotas: a request is
    refused before any work, and a stateful tenant's turn is never written to a damaged store."""
    tenant = authenticate(request.app[keys.CONFIG], request)
    refuse_if_damaged(request, tenant)
    async with request.app[keys.QUOTAS].request(tenant.name):
        yield tenant


@contextlib.asynccontextmanager
async def held(request: web.Request, tenant: TenantConfig, ref: SessionRef) -> AsyncIterator[None]:
    """The session's lock (one writer per session, across replicas in a fleet), held until the
    answer is recorded; a new session counts against the tenant's session quota."""
    async with request.app[keys.PIPELINE].session_lock(tenant, ref):
        if not tenant.stateless:
            await request.app[keys.QUOTAS].check_new_session(tenant.name, ref.id)
        yield


async def prepare(request: web.Request, tenant: TenantConfig, ref: SessionRef, body: dict[str, Any], route: ResolvedModel,
                  exchange: Exchange | None = None) -> Turn:
    """The turn, through the pipeline's stages (inside ``held``), noted for the access log."""
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    turn = await request.app[keys.PIPELINE].prepare(tenant, ref, body, route, key, exchange=exchange)
    note_turn(request, turn)
    return turn


async def answer(request: web.Request, turn: Turn, stream: bool, render: Callable[[dict[str, Any]], Any],
                 frames: Frames) -> web.StreamResponse:
    """The provider's answer: whole, as ``render`` makes the protocol's body of it, or streamed
    through the protocol's ``frames``. Its tokens count against the tenant's daily quota."""
    pipeline = request.app[keys.PIPELINE]
    if stream:
        return await relay(request, pipeline, turn, frames)
    result = await pipeline.complete(turn)
    await request.app[keys.QUOTAS].add_tokens(turn.tenant.name, turn.usage)
    return json_response(render(result), headers=turn.headers)
