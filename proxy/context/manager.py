"""The context stage of the pipeline: shape each request to its budget, summarize in the background.

``ContextManager.shape(turn)`` runs in Pipeline.prepare after history reconciliation: it counts
the request (reusing the token counts stored with each message), and when the conversation
exceeds the budget returns the messages ``assemble`` chooses, with its headers and the session's
statistics (``Shaped``); the pipeline puts them into the turn. Stored messages are never
touched. ``after_record(turn, records)`` runs once a turn is committed: it schedules segment and
session summaries (``summary_maker.py``) and the optional LLM tagger (``tagging.py``) as tracked
background tasks, which only read the store and write derived Records, never holding the
session lock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Coroutine, Sequence

from proxy import tokens
from proxy.cache import LRU, FrequencyCache
from proxy.context import caching, importance, summary_maker
from proxy.context.assemble import Assembly, ContextTooLarge, Policy, assemble, window_start
from proxy.context.budget import Budget, budget_for, request_overhead
from proxy.context.retrieval import Candidate, rank_lexical
from proxy.context.settings import ContextSettings
from proxy.context.summaries import Summary
from proxy.context.summary_maker import Incarnation, SummaryMaker, fold_threshold, segment_size
from proxy.context.tagging import LLMTags
from proxy.context.units import Item, View, build_view, shared_prefix, text_of
from proxy.errors import BadRequest
from proxy.jobs import Claims
from proxy.lifecycle import same_session
from proxy.pacing import Pace
from proxy.records import Message
from proxy.storage.base import Store
from proxy.transcript import active_path, message_hash
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.turn import Turn

log = logging.getLogger("agent_state_proxy.context")

_HOT_LLM_SEGMENTS = 4  # a request waits for the summarizer on at most this many segments
_RETRIEVE_LIMIT = 16
# The latest context view of the sessions used most (proxy/cache.py), by their messages: a view's
# size (beyond the messages themselves, plus its exchanges' term hashes) grows with them.
_CACHED_VIEW_MESSAGES = 40_000
_CACHED_VIEW_SESSIONS = 256
_CACHED_SUMMARIES = 6_000  # the sessions used most keep their summaries in memory (size: docs/BENCHMARKS.md)
_Session = Incarnation  # which session, and which incarnation of it, a background task works for


@dataclass(frozen=True)
class Shaped:
    """What the context stage decided for one request (``ContextManager.shape``)."""

    body: dict[str, Any]  # the upstream body: messages fitted to the budget, prompt-cache hints
    kept_free: int  # tokens left for the memory block, which is added after
    recalled: list[dict[str, Any]] = field(default_factory=list)  # older messages quoted back
    headers: dict[str, str] = field(default_factory=dict)  # X-Context-* response headers
    stats: dict[str, Any] | None = None  # the session's context statistics now; None: unchanged


@dataclass(frozen=True, slots=True)
class _CachedView:
    """A session's latest view and the stored message of each of its items (None: not stored)."""

    view: View
    stored: list[Message | None]
    exchanges: list[tuple[int, int, Candidate]]  # see ContextManager._rank


class ContextManager:
    """Keeps requests within their token budget; owns the background summarization tasks."""

    def __init__(self, store: Store, upstream: Upstream, claims: Claims | None = None) -> None:
        self.store = store
        self.claims = claims or Claims()  # a session's background pass runs on one replica at a time
        self.upstream = upstream
        self._tasks: set[asyncio.Task] = set()
        self._jobs: dict[tuple[str, str], asyncio.Task] = {}
        self._again: set[tuple[str, str]] = set()
        self.summaries = SummaryMaker(store, upstream, self._spawn, _CACHED_SUMMARIES)
        self._summaries = self.summaries.cache  # the summaries kept in memory
        self.tags = LLMTags(store, upstream)
        self._counts = LRU(100_000)  # (encoding, chain or hash) → tokens
        # (tenant, session, created_at, encoding, segment turns, importance) → the view of its
        # latest request. A miss rebuilds it, hashing its exchanges' terms again (docs/PERSISTENCE.md,
        # Caches), so a burst of other sessions must not push out the ones in use.
        self._views: FrequencyCache[tuple[Any, ...], _CachedView] = FrequencyCache(
            _CACHED_VIEW_MESSAGES, weigh=lambda cached: len(cached.view.items), max_entries=_CACHED_VIEW_SESSIONS)
        self._passes = LRU(10_000)  # (tenant, session) → (created_at, next_seq, newest closed segment) at the last pass
        self._closed = False

    # -- the request path ------------------------------------------------------------------

    async def shape(self, turn: Turn, reserve: int = 0) -> Shaped:
        """Fit ``turn.body["messages"]`` to the budget, less up to ``reserve`` tokens kept free
        for what is added after (the long-term memory block), and add the provider's
        prompt-cache hints (``caching.py``). Returns what it decided; the turn is not changed."""
        shaped = await self._shape(turn, reserve)
        body = caching.add_hints(shaped.body, turn.route, turn.tenant.name, turn.ref.id, turn.tenant.context)
        return replace(shaped, body=body) if body is not shaped.body else shaped

    async def _shape(self, turn: Turn, reserve: int) -> Shaped:
        settings: ContextSettings = turn.tenant.context
        body = turn.body
        if not settings.enabled or turn.tenant.stateless:
            return Shaped(body, reserve)
        budget = budget_for(settings, turn.route.requested, turn.route.model, body, reserve)
        encoding = budget.encoding
        overhead = request_overhead(body, encoding)
        llm_tags = await self.tags.of(_ref(turn)) if settings.tagger_model else None
        # The previous request's view of this session: its items and units are reused where
        # this request repeats them (the whole stored history, in a long session).
        cache_key = _view_key(_ref(turn), encoding)
        previous = self._views.get(cache_key) if llm_tags is None else None
        items, stored = await self._items(turn, body.get("messages") or [], encoding, llm_tags, previous)
        full = overhead + sum(i.tokens for i in items)
        stats = dict(turn.session.extra.get("context") or {})  # the session's statistics, updated below
        if full <= budget.prompt * settings.high_water:
            headers = _account(stats, budget, Assembly([], full, full))
            return Shaped(body, budget.kept_free, headers=headers, stats=stats)
        view = build_view(items, settings.segment_turns, importance.PRIORITY if settings.uses("importance") else None,
                          previous.view if previous is not None else None)
        available = await self._available(turn) if settings.uses("summaries") else {}
        ranked: Sequence[int] = ()
        exchanges: list[tuple[int, int, Candidate]] = []
        if settings.uses("retrieval") and settings.retrieval_share:
            ranked, exchanges = await self._rank(turn, view, stored, settings, previous)
        if llm_tags is None:
            self._views.put(cache_key, _CachedView(view, stored, exchanges))
        policy = policy_for(settings, budget.prompt)
        hint = stats.get("frontier")
        # The summaries sent with that frontier stay (frozen) while it is kept: a fold made since
        # would rewrite the prompt's front and cost its cached prefix.
        parts = (stats.get("last") or {}).get("summaries") or () if hint is not None else ()
        try:
            result = assemble(view, available, budget.prompt, policy, overhead=overhead, encoding=encoding, hint_seq=hint,
                              hint_parts=parts, ranked=ranked)
            if policy.summaries and (result.missing or result.fold) and budget.kept_free:
                # Room kept for the memory block must not make the request wait for summaries:
                # if the whole budget needs none, use it, and the memory block gets what is left.
                whole = replace(budget, prompt=budget.prompt + budget.kept_free, kept_free=0)
                policy_whole = policy_for(settings, whole.prompt)
                retry = assemble(view, available, whole.prompt, policy_whole, overhead=overhead, encoding=encoding, hint_seq=hint,
                                 hint_parts=parts, ranked=ranked)
                if not (retry.missing or retry.fold):
                    budget, policy, result = replace(whole, kept_free=min(budget.kept_free, whole.prompt - retry.tokens)), policy_whole, retry
            if policy.summaries and (result.missing or result.fold):
                # Nothing fits without summaries that do not exist yet: wait for them (bounded).
                available = await self._fill(_ref(turn), view, available, result, settings, budget)
                result = assemble(view, available, budget.prompt, policy, overhead=overhead, encoding=encoding, hint_seq=hint,
                                  hint_parts=parts, ranked=ranked)
        except ContextTooLarge as exc:
            raise _too_large(exc, budget, turn.route.requested) from None
        if result.tail_room is not None:
            # The memory block changes every request too: it shares the cap of the retrieved turns.
            budget = replace(budget, kept_free=min(budget.kept_free, result.tail_room))
        compacted = hint is None or result.frontier_seq != hint or result.used != list(parts)
        if compacted:
            # The prompt's front was rewritten: the provider's cached prefix ends here this time.
            stats["compactions"] = stats.get("compactions", 0) + 1
        headers = _account(stats, budget, result) | ({"X-Context-Compacted": "true"} if compacted else {})
        return Shaped(body | {"messages": result.messages}, budget.kept_free, result.recalled, headers, stats)

    async def _items(self, turn: Turn, messages: list[dict[str, Any]], encoding: str, llm_tags: dict[int, list[str]] | None,
               previous: _CachedView | None = None) -> tuple[list[Item], list[Message | None]]:
        """The request's messages with token counts and tags, taken from the stored messages they
        match, and those stored messages (None for a message not stored yet). The Item of
        ``previous`` (the view of the session's previous request) is reused where the same
        stored message and body come back at the same place."""
        plan = turn.plan
        if plan.parent is None:
            path: list[Message] = []
        else:
            path = plan.path if plan.path is not None else active_path(turn.stored, plan.parent.seq)
        items: list[Item] = []
        stored_of: list[Message | None] = []
        old_items, old_stored = (previous.view.items, previous.stored) if previous is not None else ((), ())
        j = 0
        pace = Pace()  # thousands of new messages: token counts in slices
        for body in messages:
            await pace.tick()
            stored: Message | None = None
            while j < len(path):
                candidate = path[j]
                if candidate.body is body or candidate.body == body or message_hash(candidate.body) == message_hash(body):
                    stored = candidate
                    j += 1
                    break
                if candidate.role in ("system", "developer"):
                    j += 1  # the client sent its own system prompt instead of the stored one
                    continue
                break
            i = len(items)
            if stored is not None and i < len(old_items) and old_stored[i] is stored and (
                    (reused := old_items[i]).body is body or reused.body == body):
                # The client resends its system prompt and recent turns as new objects: the Item
                # now carries this request's (the previous view is not used again).
                reused.body = body
                items.append(reused)
            elif stored is not None:
                tags = tuple(stored.tags or ())
                if llm_tags and stored.seq in llm_tags:
                    tags = tuple(dict.fromkeys(tags + tuple(llm_tags[stored.seq])))
                items.append(Item(body, self._stored_tokens(stored, encoding), stored.seq, tags, _chars(body)))
            else:
                items.append(Item(body, self._fresh_tokens(body, encoding), None, tuple(importance.tag_message(body) or ()), _chars(body)))
            stored_of.append(stored)
        return items, stored_of

    def _stored_tokens(self, message: Message, encoding: str) -> int:
        if message.tokens and getattr(message, "tokenizer", None) == encoding:
            return message.tokens
        key = (encoding, message.chain)
        count = self._counts.get(key)
        if count is None:
            count = tokens.count_message(message.body, encoding)
            self._counts.put(key, count)
        return count

    def _fresh_tokens(self, body: dict[str, Any], encoding: str) -> int:
        key = (encoding, message_hash(body))
        count = self._counts.get(key)
        if count is None:
            count = tokens.count_message(body, encoding)
            self._counts.put(key, count)
        return count

    async def _rank(self, turn: Turn, view: View, stored: list[Message | None], settings: ContextSettings,
                    previous: _CachedView | None = None) -> tuple[list[int], list[tuple[int, int, Candidate]]]:
        """The older units worth bringing back, best first, and the complete exchanges they were
        chosen from as (first unit, next user unit, candidate): ``previous`` (the session's
        previous view) lends the ones over units this view shares with it. ``stored``: the
        stored message of each item, whose body a candidate holds (the transcript cache's, not
        a copy the client sent)."""
        if view.last_user < 0:
            return [], []
        query = text_of(view.items[view.units[view.last_user].start].body)
        end = window_start(view, policy_for(settings, 1 << 40), 1 << 40)  # the window itself never needs retrieving
        # Candidates are exchanges: a user message and what followed it, up to the next one.
        units, items, limit = view.units, view.items, min(end, view.last_user)
        exchanges: list[tuple[int, int, Candidate]] = []
        start = view.head
        if previous is not None and previous.exchanges:
            shared = shared_prefix(previous.view.units, units)
            for exchange in previous.exchanges:
                if exchange[1] >= shared or exchange[1] > limit:
                    break
                exchanges.append(exchange)
            if exchanges:
                start = exchanges[-1][1]
        candidates = [exchange[2] for exchange in exchanges]
        for u in range(start, limit):
            if units[u].role != "user":
                continue
            v = u + 1
            while v < limit and units[v].role != "user":
                v += 1
            lo, hi = units[u].start, units[v - 1].end
            first, last = items[lo].seq, items[hi - 1].seq
            # Stored messages never change: their seqs name the exchange's text in the term cache.
            key = (turn.tenant.name, turn.ref.id, turn.session.created_at, first, last) if first is not None and last is not None else None
            bodies = tuple(items[i].body if stored[i] is None else stored[i].body for i in range(lo, hi))
            candidate = Candidate(u, first, bodies=bodies, key=key)
            candidates.append(candidate)
            if v < limit and key:  # ends where the next exchange begins, whatever the window: reusable
                exchanges.append((u, v, candidate))
        if not candidates:
            return [], exchanges
        order = rank_lexical(query, candidates, _RETRIEVE_LIMIT)
        return [candidates[i].unit for i in order if 0 <= i < len(candidates)], exchanges

    # -- summaries -------------------------------------------------------------------------

    async def _available(self, turn: Turn) -> dict[str, Summary]:
        return await self.summaries.of(_ref(turn))

    async def _summaries_of(self, ref: Incarnation) -> dict[str, Summary]:
        return await self.summaries.of(ref)

    async def _fill(self, ref: _Session, view: View, available: dict[str, Summary], result: Assembly,
                    settings: ContextSettings, budget: Budget) -> dict[str, Summary]:
        """Make the summaries ``result`` lacks: the first few with the LLM, the rest extractive."""
        encoding = budget.encoding
        merged = dict(available)
        waits = []
        final: list[Summary] = []
        pace = Pace()
        for rank, index in enumerate(result.missing):
            segment = view.segments[index]
            if segment.seqs and rank < _HOT_LLM_SEGMENTS:
                waits.append(self.summaries.segment(ref, segment, view, encoding, budget.prompt))
            else:  # not storable (unrecorded messages) or too many to wait for: made here, extractive
                size = segment_size(settings, budget.prompt)
                # Without a summarizer model this is the very summary the background pass would
                # make: kept, so the pass skips it (a restored long session has dozens).
                keep = bool(segment.seqs) and not settings.summarizer_model
                summary = merged[segment.key] = summary_maker.extractive_segment(segment, view, size, encoding, stored=keep)
                if keep:
                    final.append(summary)
                await pace.tick()  # a restored long session needs many: not all in one stall
        if final:
            await self.summaries.save(ref, *final)
        for summary in await asyncio.gather(*waits):
            merged[summary.key] = summary
        if len(result.missing) > _HOT_LLM_SEGMENTS:
            self._schedule(ref, encoding, budget.prompt)  # the background makes the rest properly
        if result.fold and result.segments:
            folded = await self.summaries.fold(ref, view, result.segments, merged, encoding, budget.prompt)
            if folded is not None:
                merged[folded.key] = folded
        return merged

    # -- after a turn is recorded: background work -------------------------------------------

    def after_record(self, turn: Turn, records: Sequence[Message]) -> None:
        """Schedule background summarization (when the session nears its budget) and LLM tagging."""
        settings: ContextSettings = turn.tenant.context
        if self._closed or not settings.enabled or turn.tenant.stateless or not records:
            return
        last = (turn.session.extra.get("context") or {}).get("last")
        if not last:
            return
        ref = _ref(turn)
        if settings.tagger_model:
            self._spawn(self.tags.tag(ref, settings, list(records)))
        if not settings.uses("summaries"):
            return
        last_seq = max(m.seq for m in records)  # once: per record it made a 4,000-message turn quadratic
        reply = sum(m.tokens for m in records if m.role == "assistant" and m.seq == last_seq)
        if last["full_tokens"] + reply < settings.summarize_at_fraction * last["budget"]:
            return
        # A pass when a segment has closed since the last one: the newest closed segment of the
        # view this request was shaped with (without it, every segment_turns turns' messages).
        cached = self._views.peek(_view_key(ref, last["encoding"]))
        newest = cached.view.segments[-1].key if cached is not None and cached.view.segments else None
        previous = self._passes.get(ref.key)
        if previous and previous[0] == ref.created_at and (
                previous[2] == newest if newest is not None else turn.session.next_seq - previous[1] < 2 * settings.segment_turns):
            return  # no new segment has closed since the last pass
        self._passes.put(ref.key, (ref.created_at, turn.session.next_seq, newest))
        self._schedule(ref, last["encoding"], last["budget"])

    def _schedule(self, ref: _Session, encoding: str, budget: int) -> None:
        if self._closed:
            return
        if ref.key in self._jobs:
            self._again.add(ref.key)  # it runs once more when the current pass ends
            return
        task = self._spawn(self._summarize(ref, encoding, budget))
        self._jobs[ref.key] = task
        task.add_done_callback(lambda _t: self._jobs.pop(ref.key, None))

    async def _summarize(self, ref: _Session, encoding: str, budget: int) -> None:
        async with self.claims.claim(f"summaries:{ref.tenant.name}\0{ref.id}") as granted:
            if granted:  # else another replica is summarizing this session: it does the work
                await self._summarize_claimed(ref, encoding, budget)

    async def _summarize_claimed(self, ref: _Session, encoding: str, budget: int) -> None:
        settings: ContextSettings = ref.tenant.context
        while True:
            self._again.discard(ref.key)
            session = await self.store.get_session(ref.tenant.name, ref.id)
            if not same_session(session, ref.created_at):
                return
            messages = await self.store.get_messages(ref.tenant.name, ref.id)
            view = await self._stored_view(ref, active_path(messages, session.head), encoding)
            available = await self.summaries.of(ref)
            policy = policy_for(settings, budget)
            end = window_start(view, policy, budget)
            closed = [s for s in view.segments if s.hi <= end and s.seqs]
            folded = max((s.index + 1 for s in closed if s.session_key in available), default=0)
            # Every closed segment, not only those the window has let go of: a closed segment
            # never changes, and a tight budget may need it as soon as it closes. Passes start
            # when a session nears its budget, so a summary made early is one needed soon.
            todo = [s for s in view.segments[folded:] if s.seqs and s.key not in available]
            # A few at a time (as many as summarizer calls may be in flight): hundreds started at
            # once all resumed in one turn of the event loop and stalled it (docs/SECURITY.md).
            for start in range(0, len(todo), summary_maker.CONCURRENT_SUMMARIES):
                batch = todo[start:start + summary_maker.CONCURRENT_SUMMARIES]
                await asyncio.gather(*(self.summaries.segment(ref, s, view, encoding, budget) for s in batch))
            available = await self.summaries.of(ref)
            unfolded = closed[folded:]
            size = sum(available[s.key].tokens_in(encoding) for s in unfolded if s.key in available)
            if folded:
                size += available[closed[folded - 1].session_key].tokens_in(encoding)
            if size > fold_threshold(settings) * budget and len(unfolded) >= 2:
                upto = len(closed) - 1 if len(unfolded) >= 3 else len(closed)  # keep the newest segment in detail
                await self.summaries.fold(ref, view, upto, available, encoding, budget)
            if ref.key not in self._again:
                return

    async def _stored_view(self, ref: _Session, path: list[Message], encoding: str) -> View:
        """The view of a session's stored path, built on its latest request's cached view: the
        Items of the messages that request held are reused with its units and closed segments,
        so a pass costs what the newest messages do, not the ~3 ms of a 1,000-message rebuild
        on the event loop, where it delayed the session's next request."""
        cached = self._views.peek(_view_key(ref, encoding))
        items: list[Item] = []
        if cached is not None:
            for item, stored, message in zip(cached.view.items, cached.stored, path):
                if stored is not message:
                    break
                items.append(item)
        previous = cached.view if cached is not None and items else None
        pace = Pace()  # the first pass over a long session counts all of it: in slices
        for m in path[len(items):]:
            items.append(Item(m.body, self._stored_tokens(m, encoding), m.seq, (), _chars(m.body)))
            await pace.tick()
        return build_view(items, ref.tenant.context.segment_turns, previous=previous)

    # -- lifecycle ---------------------------------------------------------------------------

    def forget(self, tenant: str, session_id: str) -> None:
        """Drop what is cached of a session that was deleted or rolled back (SessionLifecycle):
        its views, summaries, tags and summarization marks are read again if it comes back."""
        key = (tenant, session_id)
        self._summaries.pop(key)
        self.tags.cache.pop(key)
        self._passes.pop(key)
        for view_key in [k for k in self._views if k[:2] == key]:
            self._views.pop(view_key)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("context background task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel background work and wait for it to stop (the app's shutdown)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def policy_for(settings: ContextSettings, budget: int) -> Policy:
    return Policy(
        window_turns=settings.window_turns if settings.uses("window") else None,
        window_share=settings.window_share,
        summaries=settings.uses("summaries"),
        pin_share=settings.pin_share if settings.uses("importance") else 0.0,
        retrieval_share=settings.retrieval_share if settings.uses("retrieval") else 0.0,
        summary_estimate=segment_size(settings, budget),
        high_water=settings.high_water,
        low_water=settings.low_water,
        tail_share_of_saved=settings.tail_share_of_saved,
    )


def _account(stats: dict[str, Any], budget: Budget, result: Assembly) -> dict[str, str]:
    """Add one request to the session's context statistics; returns its X-Context-* headers."""
    sent, full = result.tokens, result.full_tokens
    stats["requests"] = stats.get("requests", 0) + 1
    stats["compressed"] = stats.get("compressed", 0) + int(result.changed)
    stats["tokens_sent"] = stats.get("tokens_sent", 0) + sent
    stats["tokens_full"] = stats.get("tokens_full", 0) + full
    stats["tokens_saved"] = stats.get("tokens_saved", 0) + full - sent
    stats["frontier"] = result.frontier_seq if result.changed else None
    stats["last"] = {
        "tokens": sent, "full_tokens": full, "budget": budget.prompt, "window": budget.window,
        "window_known": budget.window_known, "encoding": budget.encoding, "summaries": result.used,
        "covered": result.covered, "pinned": result.pinned, "retrieved": result.retrieved, "omitted": result.omitted,
    }
    return {"X-Context-Tokens": str(sent), "X-Context-Tokens-Saved": str(full - sent), "X-Context-Budget": str(budget.prompt)}


def _ref(turn: Turn) -> _Session:
    return _Session(turn.tenant, turn.ref.id, turn.session.created_at)


def _view_key(ref: _Session, encoding: str) -> tuple[Any, ...]:
    """The cached view's key: views differ by session incarnation, tokenizer and grouping."""
    settings: ContextSettings = ref.tenant.context
    return (ref.tenant.name, ref.id, ref.created_at, encoding, settings.segment_turns, settings.uses("importance"))


def _chars(body: dict[str, Any]) -> int:
    content = body.get("content")
    if isinstance(content, str) and not body.get("tool_calls"):
        return len(content)
    return len(text_of(body))


def _too_large(exc: ContextTooLarge, budget: Budget, alias: str) -> BadRequest:
    window = f"window {budget.window}" + ("" if budget.window_known else " (assumed: the model is unknown to litellm; set context.context_window)")
    return BadRequest(
        f"the system prompt and the newest messages need {exc.needed} prompt tokens, but the context budget of "
        f"model '{alias}' allows {budget.prompt} (max_context_tokens {budget.total} minus {budget.total - budget.prompt} "
        f"reserved for the completion; {window}). Shorten the newest message or raise context.max_context_tokens.",
        code="context_length_exceeded",
    )
