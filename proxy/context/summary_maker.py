"""Segment and session summaries: each made once (by the summarizer model, or extractive), kept in
memory for the sessions used most, and saved as derived records of the session they summarize.

The context manager asks for them on the request path (a summary a request cannot do without)
and in its background passes; concurrent askers of one summary share its one computation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from proxy.cache import FrequencyCache
from proxy.context import summaries as summary_store, summarizer
from proxy.context.settings import ContextSettings
from proxy.context.summaries import Summary
from proxy.context.units import Segment, View
from proxy.errors import ProxyError
from proxy.lifecycle import same_session
from proxy.storage.base import Store
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.config import TenantConfig

log = logging.getLogger("agent_state_proxy.context")

CONCURRENT_SUMMARIES = 4  # summarizer calls in flight per process


@dataclass(frozen=True)
class Incarnation:
    """Which session (and which incarnation of it) a background task works for."""

    tenant: TenantConfig
    id: str
    created_at: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant.name, self.id)


class SummaryMaker:
    """Makes, keeps and saves the summaries of sessions."""

    def __init__(self, store: Store, upstream: Upstream, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task], capacity: int) -> None:
        self.store = store
        self.upstream = upstream
        self._spawn = spawn  # the context manager's tracked background tasks
        self._inflight: dict[tuple[str, str, str], asyncio.Task] = {}
        # (tenant, session) → (created_at, {key: Summary}), bounded by summaries (proxy/cache.py):
        # a long session has many, so a bound by sessions would let memory grow with their length. A
        # miss reads them back from the store (docs/BENCHMARKS.md, tenth round).
        self.cache: FrequencyCache[tuple[str, str], tuple[float, dict[str, Summary]]] = FrequencyCache(
            capacity, weigh=lambda cached: len(cached[1]) + 1, max_entries=1024)
        self._limit: asyncio.Semaphore | None = None

    async def of(self, ref: Incarnation) -> dict[str, Summary]:
        """The session's summaries by key (read back once, then kept while the session is in use)."""
        cached = self.cache.get(ref.key)
        if cached is not None and cached[0] == ref.created_at:
            return cached[1]
        found = await summary_store.load(self.store, ref.tenant.name, ref.id)
        self.cache.put(ref.key, (ref.created_at, found))
        return found

    def segment(self, ref: Incarnation, segment: Segment, view: View, encoding: str, budget: int) -> asyncio.Future[Summary]:
        """The summary of ``segment``: made once (concurrent askers share the one computation)."""
        return self._once(ref, segment.key, lambda: self._make_segment(ref, segment, view, encoding, budget))

    def _once(self, ref: Incarnation, key: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> asyncio.Future[Any]:
        """Run ``make()`` unless a computation of ``key`` is already running; share its result."""
        slot = (ref.tenant.name, ref.id, key)
        task = self._inflight.get(slot)
        if task is None:
            task = self._spawn(make())
            self._inflight[slot] = task
            task.add_done_callback(lambda _t: self._inflight.pop(slot, None))
        return asyncio.shield(task)

    async def _make_segment(self, ref: Incarnation, segment: Segment, view: View, encoding: str, budget: int) -> Summary:
        existing = await self.store.get_record(ref.tenant.name, summary_store.KIND, segment.key, ref.id)
        if existing is not None and (found := Summary.from_value(segment.key, existing)) is not None:
            await self._remember(ref, found)
            return found
        settings: ContextSettings = ref.tenant.context
        size = segment_size(settings, budget)
        messages = _segment_messages(segment, view)
        text, method, model = None, "extractive", None
        if settings.summarizer_model:
            request = summarizer.segment_request(settings.summarizer_model, summarizer.render(messages), size)
            text = await self.llm(ref.tenant, settings, request)
            if text is not None:
                text, method, model = summarizer.fit(text, size * 3 // 2, encoding), "llm", settings.summarizer_model
        if not text:  # on the loop: a worker thread would slow requests in flight through the GIL
            summary = extractive_segment(segment, view, size, encoding, stored=True)
        else:
            summary = summary_store.make(segment.key, "segment", text, encoding, segment.seqs, method, model=model)
        await self.save(ref, summary)
        return summary

    async def fold(self, ref: Incarnation, view: View, upto: int, available: dict[str, Summary],
                    encoding: str, budget: int) -> Summary | None:
        """The session summary of segments 0..upto-1 (made once; see _make_fold)."""
        segments = view.segments[:upto]
        if not segments or not segments[-1].seqs:
            return None
        key = segments[-1].session_key
        if key in available:
            return available[key]
        return await self._once(ref, key, lambda: self._make_fold(ref, segments, key, available, encoding, budget))

    async def _make_fold(self, ref: Incarnation, segments: list[Segment], key: str, available: dict[str, Summary],
                         encoding: str, budget: int) -> Summary | None:
        """Fold the newest session summary before ``segments[-1]`` and the segment summaries since."""
        upto = len(segments)
        start = 0
        parts: list[Summary] = []
        for k in range(upto - 1, 0, -1):
            if segments[k - 1].session_key in available:
                start = k
                parts.append(available[segments[k - 1].session_key])
                break
        for segment in segments[start:]:
            part = available.get(segment.key)
            if part is None:
                return None
            parts.append(part)
        if len(parts) < 2:
            return None
        seqs = sorted({s for p in parts for s in p.seqs})
        settings: ContextSettings = ref.tenant.context
        limit = session_size(settings, budget)
        text, method, model = None, "extractive", None
        if settings.summarizer_model:
            text = await self.llm(ref.tenant, settings, summarizer.fold_request(settings.summarizer_model, [p.text for p in parts], limit))
            if text is not None:
                text, method, model = summarizer.fit(text, limit * 3 // 2, encoding), "llm", settings.summarizer_model
        if not text:  # on a worker thread: folding many summaries takes tens of ms (a rare step)
            text = await asyncio.to_thread(extractive_fold, [p.text for p in parts], limit, encoding)
        summary = summary_store.make(key, "session", text, encoding, seqs, method, model=model, parts=[p.key for p in parts])
        await self.save(ref, summary)
        return summary

    async def llm(self, tenant: TenantConfig, settings: ContextSettings, request: dict[str, Any]) -> str | None:
        """One summarizer call; None when it fails (the caller falls back to extractive)."""
        route = tenant.route(request["model"])
        if route is None:
            return None
        if self._limit is None:
            self._limit = asyncio.Semaphore(CONCURRENT_SUMMARIES)
        try:
            async with self._limit:
                response = await asyncio.wait_for(
                    self.upstream.complete(route, request, settings.summarizer_timeout), settings.summarizer_timeout
                )
        except (ProxyError, asyncio.TimeoutError) as exc:
            log.warning("summarizer %s failed (%s); using an extractive summary", request["model"], exc)
            return None
        return summarizer.reply_text(response)

    async def save(self, ref: Incarnation, *summaries: Summary) -> None:
        session = await self.store.get_session(ref.tenant.name, ref.id)
        if not same_session(session, ref.created_at):
            return  # erased (or replaced) meanwhile: its summaries must not outlive it
        await summary_store.save(self.store, ref.tenant.name, ref.id, *summaries)
        await self._remember(ref, *summaries)

    async def _remember(self, ref: Incarnation, *summaries: Summary) -> None:
        found = await self.of(ref)
        found.update((summary.key, summary) for summary in summaries)
        if self.cache.peek(ref.key) is not None:
            self.cache.put(ref.key, (ref.created_at, found))  # re-weighed


def segment_size(settings: ContextSettings, budget: int) -> int:
    """Target tokens of one segment summary: summary_tokens, less under a small budget."""
    return min(settings.summary_tokens, max(32, int(budget * 0.06)))


def session_size(settings: ContextSettings, budget: int) -> int:
    """Target tokens of a session summary: it must leave room in the summaries' share for newer segments."""
    return min(2 * settings.summary_tokens, max(64, int(fold_threshold(settings) * budget * 0.6)))


def fold_threshold(settings: ContextSettings) -> float:
    """Share of the budget the summaries may take before older ones are folded into a session summary."""
    return max(0.1, 1.0 - settings.window_share - settings.pin_share - settings.retrieval_share / 2)


def _segment_messages(segment: Segment, view: View) -> list[tuple[int | None, dict[str, Any]]]:
    first, last = view.units[segment.lo].start, view.units[segment.hi - 1].end
    return [(i.seq, i.body) for i in view.items[first:last]]


def extractive_segment(segment: Segment, view: View, size: int, encoding: str, *, stored: bool) -> Summary:
    messages = _segment_messages(segment, view)
    text = summarizer.extractive_segment(messages, size, encoding) or summarizer.fit(summarizer.render(messages), size, encoding)
    seqs = segment.seqs or tuple(s for s, _ in messages if s is not None)
    return summary_store.make(segment.key, "segment", text, encoding, seqs, "extractive", stored=stored)


def extractive_fold(parts: list[str], size: int, encoding: str) -> str:
    return summarizer.extractive_fold(parts, size, encoding) or summarizer.fit("\n".join(parts), size, encoding)
