"""LLM importance tags: the optional tagger model's tags for recorded messages, stored as derived
records and kept for the sessions used most (``context.tagger_model``)."""

from __future__ import annotations

import asyncio
import logging

from proxy.cache import LRU
from proxy.context import importance, summaries as summary_store
from proxy.context.settings import ContextSettings
from proxy.context.summary_maker import Incarnation
from proxy.context.units import text_of
from proxy.errors import ProxyError
from proxy.lifecycle import same_session
from proxy.records import Message
from proxy.storage.base import Record, Store
from proxy.upstream import Upstream

log = logging.getLogger("agent_state_proxy.context")

TAGS_KIND = "tags"


class LLMTags:
    """Asks the tagger model for tags after a turn is recorded; reads them back for a request."""

    def __init__(self, store: Store, upstream: Upstream) -> None:
        self.store = store
        self.upstream = upstream
        self.cache = LRU(1024)  # (tenant, session) → (created_at, {seq: tags})

    async def tag(self, ref: Incarnation, settings: ContextSettings, records: list[Message]) -> None:
        wanted = [(m.seq, m.body) for m in records if m.role in ("user", "assistant") and text_of(m.body).strip()]
        route = ref.tenant.route(settings.tagger_model or "")
        if not wanted or route is None:
            return
        request = importance.tagger_request(settings.tagger_model or "", wanted)
        try:
            response = await asyncio.wait_for(self.upstream.complete(route, request, settings.summarizer_timeout), settings.summarizer_timeout)
        except (ProxyError, asyncio.TimeoutError) as exc:
            log.warning("tagger %s failed (%s); rule tags only", settings.tagger_model, exc)
            return
        found = importance.parse_tagger_reply(response, [seq for seq, _ in wanted])
        if not found:
            return
        session = await self.store.get_session(ref.tenant.name, ref.id)
        if not same_session(session, ref.created_at):
            return
        records_out = [Record(TAGS_KIND, f"{seq:010d}", {"tags": tags, "model": settings.tagger_model}, ref.id) for seq, tags in found.items()]
        await summary_store.put_derived(self.store, ref.tenant.name, records_out)
        cached = self.cache.get(ref.key)
        if cached is not None and cached[0] == ref.created_at:
            cached[1].update(found)

    async def of(self, ref: Incarnation) -> dict[int, list[str]]:
        """The session's LLM tags by seq (read back once, then kept)."""
        cached = self.cache.get(ref.key)
        if cached is not None and cached[0] == ref.created_at:
            return cached[1]
        found: dict[int, list[str]] = {}
        for key, value in await self.store.scan_records(ref.tenant.name, TAGS_KIND, ref.id):
            if key.isdigit() and isinstance(value.get("tags"), list):
                found[int(key)] = [str(t) for t in value["tags"]]
        self.cache.put(ref.key, (ref.created_at, found))
        return found
