"""The load stage: a session and its stored messages, expired ones started over, damaged ones repaired."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from proxy import checkpoints, transcript
from proxy.lifecycle import SessionLifecycle
from proxy.records import Message, Session
from proxy.sessions import SessionRef
from proxy.storage.base import Store

if TYPE_CHECKING:
    from proxy.config import TenantConfig

log = logging.getLogger("agent_state_proxy.pipeline")
VERIFIED_SESSIONS = 100_000  # sessions remembered as chain-checked (bounded: each entry costs memory)
REPAIRS_KEPT = 1_000  # the newest repairs the admin API lists (each is also logged)


class SessionLoader:
    """Loads sessions; remembers which it has checked and the repairs it made."""

    def __init__(self, store: Store, lifecycle: SessionLifecycle) -> None:
        self.store = store
        self.lifecycle = lifecycle
        # Sessions repaired at load since start, newest last, for the admin API (bounded: a
        # store with many damaged sessions must not grow this without end).
        self.repaired: collections.deque[dict[str, Any]] = collections.deque(maxlen=REPAIRS_KEPT)
        # Sessions whose chain hashes this process has checked (once each: the check walks every
        # message), the most recent ones: one forgotten is checked again on its next load.
        self._verified: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    async def load(self, tenant: TenantConfig, ref: SessionRef, now: float) -> tuple[Session, list[Message]]:
        """The session (new when there is none) and its messages. Call holding the session's lock."""
        session = await self.store.get_session(tenant.name, ref.id)
        session = await self.lifecycle.expire(tenant, session, now)
        stored = await self.store.get_messages(tenant.name, ref.id)
        if (tenant.name, ref.id) in self._verified:
            self._verified.move_to_end((tenant.name, ref.id))
        else:
            stored = await self._verify_chains(tenant.name, ref.id, stored)
        problem = checkpoints.inconsistency(session, stored)
        if problem is not None:
            saved = await self.store.scan_records(tenant.name, checkpoints.KIND, ref.id)
            session = checkpoints.repair(tenant.name, ref.id, session, stored, saved, now)
            log.warning("session %s of tenant %s repaired (%s): head %s, next seq %d", ref.id, tenant.name, problem, session.head, session.next_seq)
            self.repaired.append({"tenant": tenant.name, "session": ref.id, "problem": problem, "ts": now})
            await self.store.commit(session, [])
        if session is None:
            session = Session(tenant=tenant.name, id=ref.id, created_at=now, last_active=now, user_id=ref.user_id, implicit=ref.implicit)
        return session, stored

    async def _verify_chains(self, tenant: str, session_id: str, stored: list[Message]) -> list[Message]:
        """The first load of a session by this process checks every message against its chain
        hash: one edited on disk (checksum rewritten too) is quarantined like a corrupt record."""
        broken = transcript.broken_chains(stored)
        if broken:
            await self.store.quarantine_messages(tenant, session_id, broken)
            stored = [m for m in stored if m.seq not in broken]
        self._verified[(tenant, session_id)] = None
        if len(self._verified) > VERIFIED_SESSIONS:
            self._verified.popitem(last=False)
        return stored
