"""What the admin sees of learned memories: which were extracted from which turns of a session,
which superseded which, and which memories were injected into each request. The JSON route
(proxy/server/learning_routes.py) and the inspector's pages (proxy/server/ui.py) both show these
views, so they always agree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from proxy.memory.extraction import LOG_KIND
from proxy.memory.model import ANONYMOUS_USER, Memory
from proxy.memory.supersede import SUPERSEDED_KIND
from proxy.memory.validity import expired

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService

DESCRIBED = 200  # distinct injected memories looked up for one session view; the rest by id only


async def session_view(service: MemoryService, tenant: str, session: str) -> dict[str, Any]:
    """A session's extraction runs (turns in, memories out), those memories now (live, expired,
    superseded or erased), the memories they superseded, and the memories injected into each of
    its requests."""
    store = service.store
    runs = [value | {"id": key} for key, value in await store.scan_records(tenant, LOG_KIND, session)]
    wanted = {i for run in runs for i in [*run.get("added", []), *run.get("merged", [])]}
    superseded = {key: _superseded(value) for key, value in await store.scan_records(tenant, SUPERSEDED_KIND, session)}
    replaced = {pair[0] for run in runs for pair in run.get("superseded", []) if isinstance(pair, list) and pair}
    if replaced - superseded.keys():  # superseded memories kept in the user's other sessions
        found = await store.get_session(tenant, session)
        if found is not None and found.user_id:
            superseded |= {k: v for k, v in (await _superseded_of_user(service, tenant, found.user_id)).items() if k in replaced}
    memories = []
    for memory_id in sorted(wanted):
        live = await _live(service, tenant, memory_id)
        # erased: expired and swept, deleted, or the session it was stored in erased
        memories.append(live or superseded.get(memory_id) or {"id": memory_id, "status": "erased"})
    injected, described = [], {}
    for message in await store.get_messages(tenant, session):
        if not message.injected:
            continue
        for memory_id in message.injected:
            if memory_id not in described and len(described) < DESCRIBED:
                # gone: superseded, expired and swept, or erased since
                described[memory_id] = (await _live(service, tenant, memory_id) or superseded.get(memory_id)
                                        or {"id": memory_id, "status": "gone"})
        injected.append({"seq": message.seq, "request_id": message.request_id, "memory_ids": message.injected,
                         "memories": [described.get(i, {"id": i, "status": "not_looked_up"}) for i in message.injected]})
    return {"object": "memory.session_audit", "session_id": session, "extraction_runs": runs, "memories": memories,
            "superseded": list(superseded.values()), "injected": injected}


async def user_view(service: MemoryService, tenant: str, user: str) -> dict[str, Any]:
    """A user's extracted memories: the live (or expired, not yet swept) ones, the superseded
    ones kept for audit, and the supersession chains through them, newest first."""
    mem = service.tenants[tenant].memory
    code, count = mem.user_code(user), len(mem.ids)
    live = []
    if code >= 0:
        for slot in np.flatnonzero(mem.cols.alive[:count] & (mem.cols.user[:count] == code) & (mem.cols.seq[:count] < 0)).tolist():
            found = await _live(service, tenant, mem.ids[slot] or "")
            if found is not None and "extracted" in found:
                live.append(found)
    superseded = list((await _superseded_of_user(service, tenant, user)).values())
    return {"object": "memory.user_audit", "user_id": user, "memories": live, "superseded": superseded,
            "chains": chains(live, superseded)}


def chains(live: list[dict[str, Any]], superseded: list[dict[str, Any]]) -> list[list[str]]:
    """Supersession chains as ids, newest first: from each live memory that superseded one, and
    from each superseded memory whose successor is gone, back along ``supersedes``."""
    known = {m["id"]: m for m in [*superseded, *live]}
    heads = [m["id"] for m in live if m["extracted"]["supersedes"]]
    heads += [m["id"] for m in superseded if m.get("superseded_by") not in known]
    out = []
    for head in heads:
        chain, memory_id = [head], head
        while (older := (known[memory_id]["extracted"]["supersedes"] or [None])[0]) in known and older not in chain:
            chain.append(older)
            memory_id = older
        out.append(chain)
    return out


async def _live(service: MemoryService, tenant: str, memory_id: str) -> dict[str, Any] | None:
    """A stored memory's public view with its status: live, or expired (past its type's TTL, not
    recalled, erased at the next sweep)."""
    found = await service.learning.extractor.consolidator.read(tenant, memory_id)
    if found is None:
        return None
    memory: Memory = found[0]
    return memory.public() | {"status": "expired" if expired(service.tenants[tenant].settings, memory) else "live"}


async def _superseded_of_user(service: MemoryService, tenant: str, user: str) -> dict[str, dict[str, Any]]:
    """The superseded memories kept in the user's sessions, by id, oldest session first."""
    sessions = {s.id for s in await service.store.list_sessions(tenant) if s.user_id == user}
    return {key: _superseded(value) for sid in sorted(sessions)
            for key, value in await service.store.scan_records(tenant, SUPERSEDED_KIND, sid) if value.get("user") == user}


def _superseded(value: dict[str, Any]) -> dict[str, Any]:
    user = value.get("user")
    return {"id": value.get("id"), "status": "superseded", "type": value.get("type"), "content": value.get("text"),
            "user_id": None if user == ANONYMOUS_USER else user, "session_id": value.get("session"),
            "created_at": value.get("ts"), "superseded_by": value.get("superseded_by"), "valid_to": value.get("valid_to"),
            "extracted": {"by": value.get("extracted"), "sources": value.get("sources") or [], "subject": value.get("subject"),
                          "supersedes": value.get("supersedes") or []}}
