"""The identify stage: the request's body checked, its model's route, and the session it belongs to."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from proxy.errors import NotFound
from proxy.sessions import SessionRef, agent_identity, identify as identify_session
from proxy.storage.base import Store
from proxy.validate import chat_body

if TYPE_CHECKING:
    from proxy.config import ResolvedModel, TenantConfig

AGENT_KIND = "agent"  # tenant-wide: an agent identity's latest implicit session (sessions.implicit: resume)


def route_of(tenant: TenantConfig, model: str) -> ResolvedModel:
    route = tenant.route(model)
    if route is None:
        raise NotFound(f"model '{model}' is not configured for this tenant", code="model_not_found")
    return route


def identify(tenant: TenantConfig, headers: Mapping[str, str], path_session: str | None, body: Any) -> tuple[SessionRef, dict[str, Any], ResolvedModel]:
    """The session, the checked chat body and the route of a Chat Completions request."""
    body = chat_body(body, tenant.limits, tenant.passthrough_fields)
    route = route_of(tenant, body["model"])
    ref = identify_session(tenant.name, headers, path_session, body)
    if ref.implicit and tenant.sessions.implicit == "resume" and not tenant.stateless:
        ref = dataclasses.replace(ref, agent=agent_identity(tenant.name, headers, body, ref.user_id))
    return ref, body, route


async def resume(store: Store, clock: Callable[[], float], tenant: TenantConfig, ref: SessionRef, body: dict[str, Any]) -> SessionRef:
    """The session an agent that restarted without its history continues: its latest one, if
    recent (``sessions.implicit: resume``); otherwise ``ref`` unchanged. Call before locking."""
    if ref.agent is None or any(m.get("role") in ("assistant", "tool") for m in body["messages"]):
        return ref
    latest = await store.get_record(tenant.name, AGENT_KIND, ref.agent)
    if latest is None or latest.get("session") in (None, ref.id):
        return ref
    if clock() - float(latest.get("ts") or 0) > tenant.sessions.resume_within_seconds:
        return ref
    if await store.get_session(tenant.name, latest["session"]) is None:
        return ref  # erased or expired meanwhile
    return dataclasses.replace(ref, id=latest["session"], source="resumed")
