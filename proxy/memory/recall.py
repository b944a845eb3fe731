"""Recall: find the memories relevant to a request within its latency budget and add them to
its system prompt; and the search and read-back that the memories API shares.

A recall has two phases so that the caller can overlap the query embedding (the slowest step)
with its own work: ``begin_recall`` starts the embedding (or takes over the one ``embed_query``
started as soon as the request was parsed), ``finish_recall`` searches, reads the hits back from
LMDB and injects them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from proxy import lexical
from proxy.config import MemorySettings
from proxy.memory import inject
from proxy.memory.model import EPISODIC, KIND, SEMANTIC, Memory, Scope, message_text, text_hash
from proxy.memory.state import TenantState, reverted
from proxy.memory.tenant import Hit, TenantMemory
from proxy.memory.validity import expired, recall_types
from proxy.storage.base import Store

log = logging.getLogger("agent_state_proxy.memory")

_QUERY_CHARS = 240  # embedded of a long query (head and tail; BM25 sees it all): ~55 word pieces


@dataclass
class Recall:
    """One request's recall in progress (begin_recall → finish_recall)."""

    settings: MemorySettings
    started: float  # time.perf_counter() when it began: the latency budget counts from here
    procedural_ids: list[str]
    procedural: list[str]  # standing preferences and procedures, always injected
    query: str | None = None  # None: nothing to search (small talk, no memories)
    scope: Scope | None = None
    vector: asyncio.Future[np.ndarray] | None = None  # the query embedding, computing
    degraded: str | None = None  # why the search is lexical only

    room: int = field(init=False)  # tokens the memory block may take (the context keeps them free)

    def __post_init__(self) -> None:
        self.room = self.settings.max_inject_tokens  # until the context says how much it kept

    def remaining(self) -> float:
        return max(0.0, self.settings.latency_budget_ms / 1000 - (time.perf_counter() - self.started))

    def cancel(self) -> None:
        if self.vector is not None and not self.vector.done():
            self.vector.cancel()


@dataclass
class QueryEmbedding:
    """A request's query embedding, started before its session is loaded (embed_query)."""

    query: str
    started: float  # time.perf_counter()
    vector: asyncio.Future[np.ndarray] | None
    degraded: str | None  # why there is no vector

    def cancel(self) -> None:
        if self.vector is not None and not self.vector.done():
            self.vector.cancel()


class Recaller:
    def __init__(self, tenants: Mapping[str, TenantState], store: Store) -> None:
        self.tenants, self.store = tenants, store

    # -- the request path --------------------------------------------------------------------

    def embed_query(self, tenant: str, body: dict[str, Any]) -> QueryEmbedding | None:
        state = self.tenants.get(tenant)
        if state is None or not state.settings.inject or not state.ready.is_set():
            return None
        query = query_text(body.get("messages") or [])
        if recall_for(state.memory, query) != "search":
            return None
        started = time.perf_counter()
        return QueryEmbedding(query, started, *self.start_query_embedding(state, query, state.settings.latency_budget_ms / 1000))

    def begin_recall(self, turn: Any, early: QueryEmbedding | None = None) -> Recall | None:
        try:
            recall = self._begin_recall(turn, early)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if early is not None and (recall is None or recall.vector is not early.vector):
            early.cancel()  # not needed after all (another query, nothing to search)
        return recall

    def _begin_recall(self, turn: Any, early: QueryEmbedding | None) -> Recall | None:
        state = self.tenants.get(turn.tenant.name)
        if state is None or not state.settings.inject:
            return None
        settings, counters = state.settings, state.counters
        if not state.ready.is_set():
            counters["not_ready"] += 1
            turn.headers["X-Memory-Status"] = "loading"
            return None
        mem = state.memory
        user = state.user(turn.ref.user_id or turn.session.user_id)
        procedural_ids = [i for i in (mem.ids[s] for s in mem.procedural_for(user)) if i and i in state.procedural]
        recall = Recall(settings, time.perf_counter(), procedural_ids,
                        list(settings.procedural) + [state.procedural[i] for i in procedural_ids])
        query = query_text(turn.body.get("messages") or [])
        taken = early is not None and early.query == query  # embed_query judged this query already
        verdict = "search" if taken else recall_for(mem, query)
        if verdict == "small talk":
            counters["small_talk"] += 1  # "thanks!" recalls every other thanks: nothing worth it
        elif verdict == "search":
            counters["recalls"] += 1
            recall.query, recall.scope = query, state.scope_for(user, turn.session.id)
            if taken:
                recall.started, recall.vector, recall.degraded = early.started, early.vector, early.degraded
            else:
                recall.vector, recall.degraded = self.start_query_embedding(state, query, settings.latency_budget_ms / 1000)
            if recall.vector is not None:  # how long the embedding itself took (admin stats)
                recall.vector.add_done_callback(lambda f, began=recall.started: f.cancelled() or state.embedding_latencies.append(
                    (time.perf_counter() - began) * 1000))
        if recall.query is None and not recall.procedural:
            return None
        return recall

    async def finish_recall(self, turn: Any, recall: Recall) -> None:
        state, settings = self.tenants[turn.tenant.name], recall.settings
        counters = state.counters
        memories: list[Memory] = []
        if recall.query is not None:
            # What the request already holds is not recalled again: its messages, and the older
            # ones the context stage quoted back.
            sent = [*(turn.body.get("messages") or []), *(getattr(turn, "recalled", None) or [])]
            context = {text_hash(message_text(m)) for m in sent if isinstance(m, dict) and message_text(m)}
            degraded = recall.degraded
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + recall.remaining()):
                    mem = state.memory
                    context |= {text_hash(text) for text in recall.procedural}  # in the system prompt already
                    lexical_part = mem.lexical(recall.query, recall.scope, recall_types(settings))  # while the embedding computes
                    vector, degraded = await self.query_vector(state, recall.vector, recall.degraded)
                    hits = mem.search(recall.query, vector, recall.scope, top_k=settings.top_k * 2 + 2,
                                      min_score=settings.min_score, half_life_days=settings.recency_half_life_days,
                                      exclude_hashes=context, lexical_part=lexical_part)
                    memories = await self.fetch(state, hits, recall.scope, settings.top_k)
            except TimeoutError:
                recall.cancel()
                counters["budget_misses"] += 1
                turn.headers["X-Memory-Status"] = "budget-exceeded"
                memories, degraded = [], None
            state.latencies.append((time.perf_counter() - recall.started) * 1000)
            if degraded:
                counters["degraded"] += 1
                counters["lexical_only"] += 1
                turn.headers["X-Memory-Degraded"] = degraded
        if not memories and not recall.procedural:
            return
        standing, recalled, kept, tokens = inject.render_parts(memories, recall.procedural, recall.room, recall.query or "")
        if not standing and not recalled:
            return
        turn.body = inject.inject(turn.body, standing, recalled)
        ids = recall.procedural_ids + [m.id for m in kept]
        turn.injected = ids or None
        if ids:
            turn.headers["X-Memory-Ids"] = ",".join(ids)
        if kept:
            counters["injected_requests"] += 1
            counters["memories_injected"] += len(kept)
        counters["tokens_injected"] += tokens
        turn.headers["X-Memory-Tokens"] = str(tokens)

    # -- embedding the query -----------------------------------------------------------------

    def start_query_embedding(self, state: TenantState, query: str, budget: float | None = None) -> tuple[asyncio.Future[np.ndarray] | None, str | None]:
        """The query's embedding, started (or why there is none: the search is lexical only).

        With a ``budget`` (seconds), a query that would wait longer than that behind the queries
        already queued (or in flight) is not embedded at all: under a burst the embedder cannot keep up, and
        a lexical-only search now beats a dense one after the request gave up on it."""
        embedder = state.embedder
        if embedder.query is None:
            return None, "embedder-unavailable" if embedder.error else "embedder-loading"
        if budget is not None and embedder.query.expected_wait() > budget:
            state.counters["embedder_busy"] += 1
            return None, "embedder-busy"
        return embedder.query.submit(shorten(query), now=True), None

    async def query_vector(self, state: TenantState, embedding: asyncio.Future[np.ndarray] | None, degraded: str | None) -> tuple[np.ndarray | None, str | None]:
        """The query vector once computed, or None and why (the search is then lexical only)."""
        if embedding is None:
            return None, degraded
        try:
            return await embedding, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.counters["embedder_errors"] += 1
            log.warning("memory: query embedding failed for tenant %s: %s", state.name, exc)
            return None, "embedder-unavailable"

    # -- search and read-back (shared with the memories API) ---------------------------------

    async def search(self, state: TenantState, query: str, scope: Scope, top_k: int, min_score: float,
                     half_life: float | None, exclude: set[int], types: Iterable[str] = (EPISODIC, SEMANTIC)) -> tuple[list[Hit], str | None]:
        vector, degraded = await self.query_vector(state, *self.start_query_embedding(state, query))
        if degraded:
            state.counters["lexical_only"] += 1
        hits = state.memory.search(query, vector, scope, top_k=top_k * 2 + 2, min_score=min_score,
                                   half_life_days=half_life, exclude_hashes=exclude, types=types)
        return hits, degraded

    async def fetch(self, state: TenantState, hits: list[Hit], scope: Scope, top_k: int) -> list[Memory]:
        """Read the hits back from LMDB, dropping (and forgetting) any that are no longer valid:
        erased, from a session that is gone or was replaced, rolled back, or out of scope."""
        name, mem = state.name, state.memory
        found: list[Memory] = []
        sessions: dict[str, Any] = {}
        stale: list[str] = []
        for hit in hits:
            if len(found) >= top_k:
                break
            where = mem.where[hit.slot] if hit.slot < len(mem.where) else None
            if where is None or not hit.id:
                continue
            value = await self.store.get_record(name, KIND, hit.id, where[0])
            if value is None:
                stale.append(hit.id)
                continue
            try:
                memory = Memory.from_record(value, with_vector=False)
            except (ValueError, KeyError, TypeError):
                stale.append(hit.id)
                continue
            if memory.session is not None:
                if memory.session not in sessions:
                    sessions[memory.session] = await self.store.get_session(name, memory.session)
                session = sessions[memory.session]
                if session is None or session.created_at != memory.session_created or (memory.seq is not None and memory.seq in reverted(session)):
                    stale.append(hit.id)
                    continue
            if not visible(scope, memory):
                state.counters["scope_rejections"] += 1
                continue
            if expired(state.settings, memory):
                continue  # past its type's TTL: the expiry sweep erases it
            found.append(memory)
        if stale:
            state.counters["stale_dropped"] += len(stale)
            state.forget(stale)
        return found


def visible(scope: Scope, memory: Memory) -> bool:
    """Defence in depth: the record itself must be visible to the scope."""
    if scope.kind == "tenant":
        return True
    if memory.user is None and memory.session is None:
        return True
    if scope.kind == "user":
        return memory.user is not None and memory.user == scope.user
    if memory.session is not None:
        return memory.session == scope.session
    return scope.user is not None and memory.user == scope.user


def shorten(query: str) -> str:
    """What of a query is embedded: all of a short one, head and tail of a long one (BM25 sees it all)."""
    if len(query) <= _QUERY_CHARS:
        return query
    return query[: _QUERY_CHARS * 2 // 3] + " … " + query[-_QUERY_CHARS // 3:]


def recall_for(mem: TenantMemory, query: str) -> str | None:
    """What a recall does for ``query``: "search", skip it as "small talk" (nothing beyond
    greetings and thanks), or None (no query, or no memories to search besides procedures)."""
    if not query or mem.alive - sum(len(v) for v in mem.procedural.values()) <= 0:
        return None
    return "search" if lexical.has_content(query) else "small talk"


def query_text(messages: list[Any]) -> str:
    """What to recall for: the newest user message."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""
