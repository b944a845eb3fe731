"""Forgetting on purpose: per-type TTLs (``memory.ttl``), and the erasure of one user's memories
or of what was extracted from rolled-back turns.

A memory older than its type's TTL (counted from when it was recorded, added, or for an
extracted memory last stated again) is no longer recalled (validity.py), and the sweep erases it
from LMDB and the index. Erasing a user erases every memory of theirs (episodic, API-added,
extracted) with the superseded ones kept for audit and their subject records; their transcripts
stay (DELETE /admin/sessions/{id} erases those), and the time of the erasure is kept (a
tenant-wide ``memory_user_erased`` record): extraction never learns from the user's turns
recorded before it (the backfill of their older sessions would bring the memories back).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from proxy.memory.model import KIND, TYPES, Memory
from proxy.memory.state import TenantState
from proxy.memory.supersede import SUBJECT_KIND, SUPERSEDED_KIND
from proxy.storage.base import Record, Store, Write

_CHUNK = 512  # memories erased per transaction
USER_ERASED_KIND = "memory_user_erased"  # tenant-wide, key: hash of the user id -> {"at": time of the erasure}


async def sweep(state: TenantState, store: Store, now: float | None = None) -> int:
    """Erase the tenant's memories past their type's TTL; how many."""
    settings = state.settings
    if not settings.ttl.configured() or not state.ready.is_set():
        return 0
    mem = state.memory
    now = time.time() if now is None else now
    count = len(mem.ids)
    doomed = np.zeros(count, dtype=bool)
    for memory_type, days in settings.ttl.configured():
        ttl = days * 86400.0
        doomed |= (mem.cols.kind[:count] == TYPES.index(memory_type)) & (mem.cols.ts[:count] < now - ttl)
    doomed &= mem.cols.alive[:count]
    return await erase_slots(state, store, np.flatnonzero(doomed).tolist(), "expired")


async def erase_slots(state: TenantState, store: Store, slots: list[int], counter: str) -> int:
    mem = state.memory
    pairs = [(mem.ids[s], mem.where[s][0]) for s in slots]
    pairs = [(memory_id, session) for memory_id, session in pairs if memory_id]
    for start in range(0, len(pairs), _CHUNK):
        chunk = pairs[start:start + _CHUNK]
        await store.apply([Write(state.name, records=[r for i, sid in chunk for r in Memory.erasure(i, sid)])])
        state.forget([i for i, _ in chunk])
    state.counters[counter] += len(pairs)
    return len(pairs)


async def forget_reverted(state: TenantState, store: Store, session: str, seqs: set[int]) -> int:
    """Erase the memories extracted in ``session`` from messages that were all rolled back."""
    mem = state.memory
    if not seqs:
        return 0
    slots = [s for code in mem.sessions_named(session) for s in mem.session_slots.get(code, ()) if int(mem.cols.seq[s]) < 0]
    doomed = []
    for slot in slots:
        value = await store.get_record(state.name, KIND, mem.ids[slot] or "", session)
        sources = (value or {}).get("sources") or []
        own = [s for s in sources if isinstance(s, dict) and s.get("session") == session]
        if value and value.get("extracted") and own and set(own[0].get("seqs") or []) <= seqs:
            doomed.append(slot)
    return await erase_slots(state, store, doomed, "reverted_extracted")


async def forget_user(state: TenantState, store: Store, user: str) -> dict[str, Any]:
    """Erase every memory of ``user``, superseded ones and subject records included."""
    mem, tenant = state.memory, state.name
    # First: an extraction that reads it from now on leaves the user's older turns alone.
    await store.apply([Write(tenant, records=[Record(USER_ERASED_KIND, _user_key(user), {"at": time.time()})])])
    code = mem.user_code(user)
    count = len(mem.ids)
    slots = np.flatnonzero(mem.cols.alive[:count] & (mem.cols.user[:count] == code)).tolist() if code >= 0 else []
    sessions = {mem.where[s][0] for s in slots} | {s.id for s in await store.list_sessions(tenant) if s.user_id == user}
    sessions.discard(None)
    erased = await erase_slots(state, store, slots, "users_erased_memories")
    audit = []
    for sid in sessions:
        audit += [Record(SUPERSEDED_KIND, key, None, sid) for key, value in await store.scan_records(tenant, SUPERSEDED_KIND, sid)
                  if value.get("user") == user]
    audit += [Record(SUBJECT_KIND, key, None) for key, value in await store.scan_records(tenant, SUBJECT_KIND)
              if value.get("user") == user]
    if audit:
        await store.apply([Write(tenant, records=audit)])
    return {"user_id": user, "memories_erased": erased, "audit_records_erased": len(audit)}


async def user_erased_at(store: Store, tenant: str, user: str | None) -> float:
    """When the user's memories were last erased (0.0: never; users without an id never are)."""
    if user is None:
        return 0.0
    value = await store.get_record(tenant, USER_ERASED_KIND, _user_key(user))
    at = (value or {}).get("at")
    return float(at) if isinstance(at, (int, float)) else 0.0


def _user_key(user: str) -> str:
    return hashlib.blake2b(f"user\0{user}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
