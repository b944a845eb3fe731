"""What the admin sees of learned memories: which were extracted from which turns of a session,
which superseded which, and which memories were injected into each request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from proxy.memory.extraction import LOG_KIND
from proxy.memory.model import ANONYMOUS_USER
from proxy.memory.supersede import SUPERSEDED_KIND

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService


async def session_view(service: MemoryService, tenant: str, session: str) -> dict[str, Any]:
    """A session's extraction runs (turns in, memories out), those memories now (live or
    superseded), and the memories injected into each of its requests."""
    store = service.store
    runs = [value | {"id": key} for key, value in await store.scan_records(tenant, LOG_KIND, session)]
    wanted = {i for run in runs for i in [*run.get("added", []), *run.get("merged", [])]}
    superseded = {key: _superseded(value) for key, value in await store.scan_records(tenant, SUPERSEDED_KIND, session)}
    memories = []
    for memory_id in sorted(wanted):
        found = await service.learning.extractor.consolidator.read(tenant, memory_id)
        if found is not None:
            memories.append(found[0].public() | {"status": "live"})
        elif memory_id in superseded:
            memories.append(superseded[memory_id])
        else:
            memories.append({"id": memory_id, "status": "erased"})  # expired, deleted, or its first session erased
    injected = [{"seq": m.seq, "request_id": m.request_id, "memory_ids": m.injected}
                for m in await store.get_messages(tenant, session) if m.injected]
    return {"object": "memory.session_audit", "session_id": session, "extraction_runs": runs, "memories": memories,
            "superseded": list(superseded.values()), "injected": injected}


async def user_view(service: MemoryService, tenant: str, user: str) -> dict[str, Any]:
    """A user's extracted memories: the live ones, and the superseded ones kept for audit."""
    mem = service.tenants[tenant].memory
    code, count = mem.user_code(user), len(mem.ids)
    live = []
    if code >= 0:
        for slot in np.flatnonzero(mem.cols.alive[:count] & (mem.cols.user[:count] == code) & (mem.cols.seq[:count] < 0)).tolist():
            found = await service.learning.extractor.consolidator.read(tenant, mem.ids[slot] or "")
            if found is not None and found[0].extracted:
                live.append(found[0].public() | {"status": "live"})
    sessions = {s.id for s in await service.store.list_sessions(tenant) if s.user_id == user}
    superseded = [_superseded(value) for sid in sorted(sessions)
                  for _, value in await service.store.scan_records(tenant, SUPERSEDED_KIND, sid) if value.get("user") == user]
    return {"object": "memory.user_audit", "user_id": user, "memories": live, "superseded": superseded}


def _superseded(value: dict[str, Any]) -> dict[str, Any]:
    user = value.get("user")
    return {"id": value.get("id"), "status": "superseded", "type": value.get("type"), "content": value.get("text"),
            "user_id": None if user == ANONYMOUS_USER else user, "session_id": value.get("session"),
            "created_at": value.get("ts"), "superseded_by": value.get("superseded_by"), "valid_to": value.get("valid_to"),
            "extracted": {"by": value.get("extracted"), "sources": value.get("sources") or [], "subject": value.get("subject"),
                          "supersedes": value.get("supersedes") or []}}
