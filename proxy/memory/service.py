"""Long-term memory of every tenant: remember recorded messages and API-added memories, recall
the relevant ones for a request within its latency budget, keep LMDB and the index in step.

LMDB is the source of truth: each memory is a Record (kind ``memory``) holding its text and
metadata, and once embedded a second one (kind ``memory_vector``, same key) holding its vector;
memories of a session are session-scoped records, so whatever erases a session erases them in
the same transaction. The in-memory structures (BM25, vector copies,
the usearch index) are rebuilt or reconciled from LMDB at start-up, in the background.

Three background tasks, one of each per process:
* the indexer embeds and stores new memories (never on the request path);
* the index worker applies every usearch change, one at a time, on one thread;
* maintenance saves dirty indexes and drops memories of sessions that are gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from proxy import priority
from proxy.config import LOCAL_EMBEDDERS, MemorySettings, TenantConfig
from proxy.errors import BadRequest, NotFound, NotReady
from proxy.idle_gc import release_freed_memory
from proxy.memory import inject, lexical
from proxy.memory.embedder import EmbeddingBatcher
from proxy.memory.fleet_sync import FleetSync
from proxy.memory.model import (
    ANONYMOUS_USER, EPISODIC, KIND, PROCEDURAL, SEMANTIC, TYPES, VECTOR_KIND, Memory, Scope, episodic_id, message_text, new_id,
    text_hash,
)
from proxy.memory.remote import LOCAL_ENGINES, UpstreamEmbedder, embed_remote, local_model
from proxy.memory.tenant import Hit, TenantMemory, index_text
from proxy.memory.vectors import IndexFileError, VectorIndex
from proxy.pacing import Pace
from proxy.records import Message
from proxy.storage.base import Record, Store, Write
from proxy.upstream import Upstream

log = logging.getLogger("agent_state_proxy.memory")

MANIFEST_KIND, MANIFEST_KEY = "memory_index", "manifest"  # tenant-wide: what the index file holds
MARK_KIND, MARK_KEY = "memory_mark", "next"  # session-scoped: messages below this seq were indexed
INDEX_DTYPE = "i8"
MAX_TEXT = 8000
_QUEUE_MAX = 100_000
_EMBED_CHUNK = 16
_CONTEXT_CHARS = 500  # of the previous message, indexed with each message
_INDEX_CHUNK = 8  # texts per background embedding call (~0.25 s of CPU)
_LOAD_PAGE = 1024  # memory records decoded at a time at start-up
# Jobs indexed together: their memories become searchable together once all are embedded, so
# a small batch keeps them searchable soon after they are recorded (~0.3 s of embedding).
_INDEX_BATCH = 32
_INSERT_SLICE = 8  # memories made searchable between two yields to the event loop (~1 ms)
# usearch holds the GIL while it writes an index (60-350 ms for 100k i8 vectors, measured),
# stalling the event loop and every request with it: saves wait for this long without
# requests (priority.activity), or at most _SAVE_MAX_WAIT, so a never-quiet proxy still saves.
_SAVE_QUIET = 0.5
_SAVE_MAX_WAIT = 600.0
_QUERY_CHARS = 240  # embedded of a long query (head and tail; BM25 sees it all): ~55 word pieces, ~5 ms int8 on one core


@dataclass
class Recall:
    """One request's recall in progress (MemoryService.begin_recall → finish_recall)."""

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
    """A request's query embedding, started before its session is loaded (MemoryService.embed_query)."""

    query: str
    started: float  # time.perf_counter()
    vector: asyncio.Future[np.ndarray] | None
    degraded: str | None  # why there is no vector

    def cancel(self) -> None:
        if self.vector is not None and not self.vector.done():
            self.vector.cancel()


@dataclass
class _Job:
    tenant: str
    memory: Memory | None  # a new episodic memory (None: only advance the mark)
    session: str | None = None
    created: float | None = None
    mark: int | None = None  # the session's messages below this seq are handled by this job
    reembed: str | None = None  # id of a stored memory that still lacks a vector


class _Embedder:
    """One embedding model with two batchers: queries never wait behind indexing batches."""

    def __init__(self, key: str, model_name: str) -> None:
        self.key, self.model_name = key, model_name
        self.query: EmbeddingBatcher | None = None
        self.index: EmbeddingBatcher | None = None
        self.dim: int | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()

    def set(self, embedder: Any) -> None:
        self.dim = int(embedder.dim)
        self.query = EmbeddingBatcher(embedder, max_batch=16)
        self.index = EmbeddingBatcher(embedder, max_batch=_EMBED_CHUNK, background=priority.requests.pause_for_requests,
                                      worker_initializer=priority.background_thread)
        self.error = None
        self.ready.set()

    async def close(self) -> None:
        for batcher in (self.query, self.index):
            if batcher is not None:
                await batcher.aclose()


class MemoryService:
    def __init__(self, store: Store, upstream: Upstream, tenants: Iterable[TenantConfig], index_dir: Path, *,
                 save_interval: float = 60.0, vacuum_interval: float = 120.0) -> None:
        self.store, self.upstream, self.index_dir = store, upstream, Path(index_dir)
        self.configs = {t.name: t for t in tenants}
        self.settings: dict[str, MemorySettings] = {
            name: t.memory for name, t in self.configs.items() if t.memory.enabled and not t.stateless
        }
        self.save_interval, self.vacuum_interval = save_interval, vacuum_interval
        self.memories: dict[str, TenantMemory] = {}
        self.ready: dict[str, asyncio.Event] = {}
        self.counters: dict[str, collections.Counter[str]] = {}
        self.latencies: dict[str, collections.deque[float]] = {}  # whole recalls, ms
        self.embedding_latencies: dict[str, collections.deque[float]] = {}  # their query embeddings, ms
        self._procedural: dict[str, dict[str, str]] = {}  # tenant -> id -> text of API procedural memories
        self._embedders: dict[str, _Embedder] = {}
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._ops: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._opening: set[str] = set()  # tenants whose saved index is not opened yet
        self._reembedding: set[str] = set()  # ids queued for a vector they are missing
        self._sessions_forgotten = 0  # forget_session calls so far (an indexing batch checks it)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-index", initializer=priority.background_thread)
        # usearch holds the GIL for a whole save or load (63 ms to ~350 ms at 100k): not on a
        # SCHED_IDLE thread, which could be preempted holding it (proxy/priority.py).
        self._file_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-index-file", initializer=priority.low_priority_thread)
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------

        for name in self.settings:
            self.memories[name] = TenantMemory(name)
            self.ready[name] = asyncio.Event()
            self.counters[name] = collections.Counter()
            self.latencies[name] = collections.deque(maxlen=2000)
            self.embedding_latencies[name] = collections.deque(maxlen=2000)
            self._procedural[name] = {}
            key = self._embedder_key(name)
            if key not in self._embedders:
                self._embedders[key] = _Embedder(key, self._model_name(name))
        self.fleet = FleetSync.of(self, (MARK_KIND, MARK_KEY))  # fleet mode: the index follows PostgreSQL

    async def start(self) -> None:
        """Schedule loading in the background and return at once (start-up stays fast)."""
        if not self.settings:
            return
        started: set[str] = set()
        for name in self.settings:
            key = self._embedder_key(name)
            if key not in started:
                started.add(key)
                self._tasks.append(asyncio.create_task(self._init_embedder(name, self._embedders[key]), name=f"memory-embedder-{key}"))
        for name in self.settings:
            self._tasks.append(asyncio.create_task(self._load(name), name=f"memory-load-{name}"))
        self._tasks.append(asyncio.create_task(self._indexer(), name="memory-indexer"))
        self._tasks.append(asyncio.create_task(self._index_worker(), name="memory-index-worker"))
        self._tasks.append(asyncio.create_task(self._maintenance(), name="memory-maintenance"))
        self._tasks.append(asyncio.create_task(self._saver(), name="memory-saver"))
        if self.fleet is not None:
            self._tasks += self.fleet.start()

    async def close(self, drain_timeout: float = 3.0) -> None:
        """Finish queued indexing (briefly: what is left is caught up at the next start from the
        transcripts), save changed indexes, stop the workers."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.drain(), drain_timeout)
        for name in list(self._dirty):
            await self._ops.put(("save", name))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ops.join(), 20.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.fleet is not None:
            await self.fleet.close()
        for embedder in self._embedders.values():
            await embedder.close()
        self._executor.shutdown(wait=True)
        self._file_executor.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until every queued memory is indexed and every index change applied (tests, benchmarks)."""
        for name in self.settings:
            await self.ready[name].wait()
        await self._jobs.join()
        await self._ops.join()

    def enabled(self, tenant: str) -> bool:
        return tenant in self.settings

    # -- the request path --------------------------------------------------------------------

    def embed_query(self, tenant: str, body: dict[str, Any]) -> QueryEmbedding | None:
        """Start embedding what the request will recall for, as soon as it is parsed: the
        embedding is the slowest step of a recall, so whatever runs before it (loading the
        session, reconciling its history) would add to the request. None when there will be no
        recall (or no vector to wait for). Hand it to ``begin_recall``, or cancel it."""
        settings = self.settings.get(tenant)
        if settings is None or not settings.inject or not self.ready[tenant].is_set():
            return None
        query = _query_text(body.get("messages") or [])
        if _recall_for(self.memories[tenant], query) != "search":
            return None
        started = time.perf_counter()
        return QueryEmbedding(query, started, *self._start_query_embedding(tenant, query, settings.latency_budget_ms / 1000))

    def begin_recall(self, turn: Any, early: QueryEmbedding | None = None) -> Recall | None:
        """Start recalling for this request; None when there is nothing to recall.

        The query embedding starts now on the embedder's thread (or was started by
        ``embed_query``: ``early``, taken over here), so the caller can assemble the context
        meanwhile (keeping ``Recall.room`` tokens free for the memory block); ``finish_recall``
        then searches and adds the memories to the system prompt.
        """
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
        name = turn.tenant.name
        settings = self.settings.get(name)
        if settings is None or not settings.inject:
            return None
        counters = self.counters[name]
        if not self.ready[name].is_set():
            counters["not_ready"] += 1
            turn.headers["X-Memory-Status"] = "loading"
            return None
        mem = self.memories[name]
        user = self._user(settings, turn.ref.user_id or turn.session.user_id)
        procedural_ids = [i for i in (mem.ids[s] for s in mem.procedural_for(user)) if i and i in self._procedural[name]]
        recall = Recall(settings, time.perf_counter(), procedural_ids,
                        list(settings.procedural) + [self._procedural[name][i] for i in procedural_ids])
        query = _query_text(turn.body.get("messages") or [])
        taken = early is not None and early.query == query  # embed_query judged this query already
        verdict = "search" if taken else _recall_for(mem, query)
        if verdict == "small talk":
            counters["small_talk"] += 1  # "thanks!" recalls every other thanks: nothing worth it
        elif verdict == "search":
            counters["recalls"] += 1
            recall.query, recall.scope = query, self.scope_for(settings, user, turn.session.id)
            if taken:
                recall.started, recall.vector, recall.degraded = early.started, early.vector, early.degraded
            else:
                recall.vector, recall.degraded = self._start_query_embedding(name, query, settings.latency_budget_ms / 1000)
            if recall.vector is not None:  # how long the embedding itself took (admin stats)
                recall.vector.add_done_callback(lambda f, began=recall.started: f.cancelled() or self.embedding_latencies[name].append(
                    (time.perf_counter() - began) * 1000))
        if recall.query is None and not recall.procedural:
            return None
        return recall

    async def finish_recall(self, turn: Any, recall: Recall) -> None:
        """Search, read back and inject the memories; sets ``turn.injected`` (recorded on the
        answer) and the X-Memory-* response headers. The whole recall, embedding included,
        stays within the tenant's latency budget."""
        name, settings = turn.tenant.name, recall.settings
        counters = self.counters[name]
        memories: list[Memory] = []
        if recall.query is not None:
            # What the request already holds is not recalled again: its messages, and the older
            # ones the context stage quoted back.
            sent = [*(turn.body.get("messages") or []), *(getattr(turn, "recalled", None) or [])]
            context = {text_hash(message_text(m)) for m in sent if isinstance(m, dict) and message_text(m)}
            degraded = recall.degraded
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + recall.remaining()):
                    mem = self.memories[name]
                    lexical_part = mem.lexical(recall.query, recall.scope)  # while the embedding computes
                    vector, degraded = await self._query_vector(name, recall.vector, recall.degraded)
                    hits = mem.search(recall.query, vector, recall.scope, top_k=settings.top_k * 2 + 2,
                                      min_score=settings.min_score, half_life_days=settings.recency_half_life_days,
                                      exclude_hashes=context, lexical_part=lexical_part)
                    memories = await self._fetch(name, hits, recall.scope, settings.top_k)
            except TimeoutError:
                recall.cancel()
                counters["budget_misses"] += 1
                turn.headers["X-Memory-Status"] = "budget-exceeded"
                memories, degraded = [], None
            self.latencies[name].append((time.perf_counter() - recall.started) * 1000)
            if degraded:
                counters["degraded"] += 1
                counters["lexical_only"] += 1
                turn.headers["X-Memory-Degraded"] = degraded
        if not memories and not recall.procedural:
            return
        standing, recalled, kept, tokens = inject.render_parts(memories, recall.procedural, recall.room)
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

    async def recall(self, turn: Any) -> None:
        """Both phases at once (callers with nothing to overlap with the query embedding)."""
        recall = self.begin_recall(turn)
        if recall is not None:
            await self.finish_recall(turn, recall)

    def _start_query_embedding(self, name: str, query: str, budget: float | None = None) -> tuple[asyncio.Future[np.ndarray] | None, str | None]:
        """The query's embedding, started (or why there is none: the search is lexical only).

        With a ``budget`` (seconds), a query that would wait longer than that behind the queries
        already queued (or in flight) is not embedded at all: under a burst the embedder cannot keep up, and
        a lexical-only search now beats a dense one after the request gave up on it."""
        embedder = self._embedders[self._embedder_key(name)]
        if embedder.query is None:
            return None, "embedder-unavailable" if embedder.error else "embedder-loading"
        if budget is not None and embedder.query.expected_wait() > budget:
            self.counters[name]["embedder_busy"] += 1
            return None, "embedder-busy"
        return embedder.query.submit(_shorten(query), now=True), None

    async def _query_vector(self, name: str, embedding: asyncio.Future[np.ndarray] | None, degraded: str | None) -> tuple[np.ndarray | None, str | None]:
        """The query vector once computed, or None and why (the search is then lexical only)."""
        if embedding is None:
            return None, degraded
        try:
            return await embedding, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters[name]["embedder_errors"] += 1
            log.warning("memory: query embedding failed for tenant %s: %s", name, exc)
            return None, "embedder-unavailable"

    async def after_record(self, turn: Any, messages: list[Message]) -> None:
        """Queue the recorded user and assistant messages for indexing (the work is done later)."""
        name = turn.tenant.name
        settings = self.settings.get(name)
        if settings is None or not settings.episodic or not messages:
            return
        if self._jobs.qsize() >= _QUEUE_MAX:
            self.counters[name]["index_dropped"] += len(messages)
            return
        session = turn.session
        user = self._user(settings, turn.ref.user_id or session.user_id)
        mark = max(m.seq for m in messages) + 1
        parent = getattr(turn.plan, "parent", None)
        known = {m.seq: m for m in messages} | ({parent.seq: parent} if parent is not None else {})
        jobs: list[_Job] = []
        pace = Pace()  # a new session of thousands of messages: its jobs are made in slices
        for m in messages:
            if (memory := _episodic(name, session.id, session.created_at, user, m, known.get(m.parent))) is not None:
                jobs.append(_Job(name, memory, session.id, session.created_at))
            await pace.tick()
        jobs.append(_Job(name, None, session.id, session.created_at, mark=mark))
        for job in jobs:
            self._jobs.put_nowait(job)

    def scope_for(self, settings: MemorySettings, user: str | None, session: str) -> Scope:
        if user is None:
            # Without a user id the session is the only safe boundary (anonymous="shared" maps
            # requests without one to a single tenant-wide anonymous user instead).
            return Scope("session", None, session)
        return Scope(settings.scope, user, session)

    @staticmethod
    def _user(settings: MemorySettings, user: str | None) -> str | None:
        if user is None and settings.anonymous == "shared":
            return ANONYMOUS_USER
        return user

    async def _search(self, name: str, query: str, scope: Scope, top_k: int, min_score: float,
                      half_life: float | None, exclude: set[int], types: Iterable[str] = (EPISODIC, SEMANTIC)) -> tuple[list[Hit], str | None]:
        vector, degraded = await self._query_vector(name, *self._start_query_embedding(name, query))
        if degraded:
            self.counters[name]["lexical_only"] += 1
        hits = self.memories[name].search(query, vector, scope, top_k=top_k * 2 + 2, min_score=min_score,
                                          half_life_days=half_life, exclude_hashes=exclude, types=types)
        return hits, degraded

    async def _fetch(self, name: str, hits: list[Hit], scope: Scope, top_k: int) -> list[Memory]:
        """Read the hits back from LMDB, dropping (and forgetting) any that are no longer valid:
        erased, from a session that is gone or was replaced, rolled back, or out of scope."""
        mem = self.memories[name]
        found: list[Memory] = []
        sessions: dict[str, Any] = {}
        stale: list[str] = []
        for hit in hits:
            if len(found) >= top_k:
                break
            where = mem.where[hit.slot] if hit.slot < len(mem.where) else None
            if where is None or not hit.id:
                continue
            session_id = where[0]
            value = await self.store.get_record(name, KIND, hit.id, session_id)
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
                if session is None or session.created_at != memory.session_created or (memory.seq is not None and memory.seq in _reverted(session)):
                    stale.append(hit.id)
                    continue
            if not _visible(scope, memory):
                self.counters[name]["scope_rejections"] += 1
                continue
            found.append(memory)
        if stale:
            self.counters[name]["stale_dropped"] += len(stale)
            self._forget(name, stale)
        return found

    # -- the memories API --------------------------------------------------------------------

    def _tenant(self, tenant: str) -> TenantMemory:
        if tenant not in self.settings:
            raise BadRequest("long-term memory is disabled for this tenant (memory.enabled, stateless)", code="memory_disabled")
        if not self.ready[tenant].is_set():
            raise NotReady("long-term memory is still loading; retry shortly")
        return self.memories[tenant]

    async def add(self, tenant: str, content: str, type: str = SEMANTIC, user: str | None = None,
                  session: str | None = None, metadata: dict[str, Any] | None = None) -> Memory:
        """Store a semantic or procedural memory now (embedded at once when the embedder is up)."""
        mem = self._tenant(tenant)
        created = None
        if session is not None:
            found = await self.store.get_session(tenant, session)
            if found is None:
                raise NotFound(f"no session '{session}' for this tenant", code="session_not_found")
            created = found.created_at
        memory = Memory(id=new_id(), type=type, text=content, ts=time.time(), key=self._allocate_key(mem),
                        user=user, session=session, session_created=created, metadata=metadata or None)
        embedder = self._embedders[self._embedder_key(tenant)]
        if embedder.index is not None:
            try:
                vector = await asyncio.wait_for(embedder.index.embed(index_text(memory)[:4000]), 30)
                memory.vector, memory.model = vector, embedder.model_name
            except (asyncio.TimeoutError, Exception) as exc:  # stored lexically; re-embedded later
                self.counters[tenant]["embedder_errors"] += 1
                log.warning("memory: embedding a new memory failed for tenant %s: %s", tenant, exc)
        await self.store.apply([Write(tenant, records=memory.records())])
        self._insert(tenant, [memory])
        if memory.vector is None and embedder.index is not None:  # it came up meanwhile: embed now
            self._queue_reembedding(tenant)
        return memory

    async def get(self, tenant: str, memory_id: str) -> Memory:
        mem = self._tenant(tenant)
        slot = mem.ids.slot(memory_id)
        value = None
        if slot is not None:
            value = await self.store.get_record(tenant, KIND, memory_id, mem.where[slot][0])
        if value is None:
            raise NotFound(f"no memory '{memory_id}' for this tenant", code="memory_not_found")
        return Memory.from_record(value)

    async def list(self, tenant: str, *, type: str | None = None, user: str | None = None, session: str | None = None,
                   limit: int = 100, after: str | None = None) -> tuple[list[Memory], bool]:
        """Memories in insertion order (oldest first), ``limit`` after the id ``after``."""
        mem = self._tenant(tenant)
        start = 0
        if after is not None:
            slot = mem.ids.slot(after)
            if slot is None:
                raise BadRequest(f"'after': no memory '{after}' for this tenant", code="invalid_cursor")
            start = slot + 1
        cols = mem.cols
        user_code = mem.user_code(user) if user is not None else None
        sessions = set(mem.sessions_named(session)) if session is not None else None
        type_code = TYPES.index(type) if type is not None else None
        found: list[Memory] = []
        more = False
        for slot in range(start, len(mem.ids)):
            if not cols.alive[slot]:
                continue
            if type_code is not None and cols.kind[slot] != type_code:
                continue
            if user_code is not None and cols.user[slot] != user_code:
                continue
            if sessions is not None and int(cols.session[slot]) not in sessions:
                continue
            if len(found) >= limit:
                more = True
                break
            value = await self.store.get_record(tenant, KIND, mem.ids[slot] or "", mem.where[slot][0])
            if value is not None:
                found.append(Memory.from_record(value, with_vector=False))
        return found, more

    async def search(self, tenant: str, query: str, scope: Scope, *, top_k: int, types: Iterable[str],
                     min_score: float | None = None) -> tuple[list[tuple[Memory, Hit]], str | None]:
        self._tenant(tenant)
        settings = self.settings[tenant]
        hits, degraded = await self._search(tenant, query, scope, top_k, settings.min_score if min_score is None else min_score,
                                            settings.recency_half_life_days, set(), types)
        memories = await self._fetch(tenant, hits, scope, top_k)
        by_id = {h.id: h for h in hits}
        return [(m, by_id[m.id]) for m in memories], degraded

    async def delete(self, tenant: str, memory_id: str) -> None:
        mem = self._tenant(tenant)
        slot = mem.ids.slot(memory_id)
        if slot is None:
            raise NotFound(f"no memory '{memory_id}' for this tenant", code="memory_not_found")
        await self.store.apply([Write(tenant, records=Memory.erasure(memory_id, mem.where[slot][0]))])
        self._forget(tenant, [memory_id])

    async def forget_session(self, tenant: str, session_id: str) -> int:
        """Drop a deleted session's memories from the index (LMDB erased them with the session)."""
        mem = self.memories.get(tenant)
        if mem is None:
            return 0
        ids = mem.session_memories(session_id)
        self._forget(tenant, ids)
        self._sessions_forgotten += 1
        return len(ids)

    async def forget_messages(self, tenant: str, session_id: str, seqs: Iterable[int]) -> int:
        """Forget the memories of rolled-back messages, in LMDB and in the index."""
        mem = self.memories.get(tenant)
        wanted = set(seqs)
        if mem is None or not wanted:
            return 0
        doomed = [(mem.ids[s], mem.where[s][0]) for code in mem.sessions_named(session_id)
                  for s in list(mem.session_slots.get(code, ())) if mem.ids[s] and int(mem.cols.seq[s]) in wanted]
        if doomed:
            await self.store.apply([Write(tenant, records=[r for i, sid in doomed for r in Memory.erasure(i, sid)])])
            self._forget(tenant, [i for i, _ in doomed])
        return len(doomed)

    def stats(self, tenant: str) -> dict[str, Any]:
        settings = self.settings.get(tenant)
        if settings is None:
            return {"enabled": False}
        mem = self.memories[tenant]
        embedder = self._embedders[self._embedder_key(tenant)]
        return {
            "enabled": True,
            "ready": self.ready[tenant].is_set(),
            "scope": settings.scope,
            "embedder": {"name": embedder.model_name, "ready": embedder.query is not None, "error": embedder.error, "dim": embedder.dim},
            "index": mem.stats() | {"hnsw_ready": mem.hnsw_ready, "dtype": INDEX_DTYPE, "pending_jobs": self._jobs.qsize(), "pending_index_ops": self._ops.qsize()},
            "counters": dict(self.counters[tenant]),
            "recall_latency_ms": _percentiles(self.latencies[tenant]) | {"budget": settings.latency_budget_ms},
            # the floor of a recall: its query's embedding, as measured under the real load
            "query_embedding_ms": _percentiles(self.embedding_latencies[tenant]),
        }

    # -- keeping the structures in step -------------------------------------------------------

    def _allocate_key(self, mem: TenantMemory) -> int:
        key = mem.next_key
        mem.next_key += 1
        return key

    def _insert(self, tenant: str, memories: list[Memory]) -> None:
        mem = self.memories[tenant]
        keys, vectors = [], []
        for memory in memories:
            if self.fleet is not None and memory.id in mem.ids:
                continue  # the fleet's change log brought it first
            mem.insert(memory)
            if memory.type == PROCEDURAL:
                self._procedural[tenant][memory.id] = memory.text
            if memory.vector is not None and mem.mirror is not None and len(memory.vector) == mem.mirror.dim:
                keys.append(memory.key)
                vectors.append(memory.vector)
        if keys:
            self._ops.put_nowait(("add", tenant, np.array(keys, dtype=np.uint64), np.stack(vectors)))

    def _forget(self, tenant: str, ids: Iterable[str]) -> None:
        mem = self.memories[tenant]
        keys = []
        for memory_id in ids:
            key = mem.remove(memory_id)
            self._procedural[tenant].pop(memory_id, None)
            if key is not None:
                keys.append(key)
        if keys:
            self._ops.put_nowait(("remove", tenant, keys))

    async def _write(self, tenant: str, records: list[Record]) -> None:
        if not records:
            return
        later = getattr(self.store, "apply_later", None)
        write = Write(tenant, records=records)
        if later is not None:
            await later([write])  # a lost memory record is rebuilt from the transcript (the mark)
        else:
            await self.store.apply([write])

    # -- embedders ---------------------------------------------------------------------------

    def _embedder_key(self, tenant: str) -> str:
        alias = self.settings[tenant].embedder
        return alias if alias in LOCAL_EMBEDDERS else f"{tenant}:{alias}"

    def _model_name(self, tenant: str) -> str:
        alias = self.settings[tenant].embedder
        if alias in LOCAL_EMBEDDERS:
            return f"local/{LOCAL_ENGINES[alias].name}"
        route = self.configs[tenant].route(alias)
        return route.model if route else alias

    async def _init_embedder(self, tenant: str, embedder: _Embedder) -> None:
        alias = self.settings[tenant].embedder
        if alias in LOCAL_EMBEDDERS:
            try:
                embedder.set(await asyncio.to_thread(local_model, alias))
            except Exception as exc:
                embedder.error = str(exc)
                log.error("memory: the local embedder could not load (%s); memory is lexical only", exc)
            else:
                self._embed_what_waited(embedder)
            return
        config = self.configs[tenant]
        route = config.route(alias)
        timeout = min(config.upstream_timeout, 30.0)
        delay = 1.0
        while True:
            try:
                probe = await embed_remote(self.upstream, route, ["dimension probe"], timeout)
                embedder.set(UpstreamEmbedder(self.upstream, route, int(probe.shape[1]), timeout, asyncio.get_running_loop()))
                log.info("memory: embedder %s ready (%d dimensions)", embedder.model_name, embedder.dim)
                self._embed_what_waited(embedder)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                embedder.error = str(exc)[:300]
                log.warning("memory: embedder %s unavailable (%s); retrying in %.0fs", embedder.model_name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    # -- start-up: LMDB -> memory structures -> index -----------------------------------------

    def _embed_what_waited(self, embedder: _Embedder) -> None:
        """Memories accepted while this embedder was loading (or down) are embedded now, not at
        the next maintenance round: until then a search by meaning cannot find them."""
        for tenant in self.settings:
            if self._embedder_key(tenant) == embedder.key and self.ready[tenant].is_set():
                self._queue_reembedding(tenant)

    async def _load(self, tenant: str) -> None:
        try:
            await self._load_tenant(tenant)
        except Exception:
            log.exception("memory: loading tenant %s failed; its memory starts empty", tenant)
        finally:
            self.ready[tenant].set()
        if self._embedders[self._embedder_key(tenant)].index is not None:
            self._queue_reembedding(tenant)  # the embedder was up before this tenant finished loading

    async def _load_tenant(self, tenant: str) -> None:
        started = time.perf_counter()
        mem = self.memories[tenant]
        model = self._model_name(tenant)
        catch_up: list[tuple[Any, int]] = []
        if self.fleet is not None:  # from one snapshot of PostgreSQL, in one streamed query
            catch_up = await self.fleet.load(tenant, model, _decode_all, self.settings[tenant].episodic)
        else:
            sessions = {s.id: s for s in await self.store.list_sessions(tenant)}
            await self._load_records(tenant, None, sessions, model)
            for sid, session in sessions.items():
                await self._load_records(tenant, sid, sessions, model)
                mark = await self.store.get_record(tenant, MARK_KIND, MARK_KEY, sid)
                indexed = int(mark["next"]) if mark and mark.get("created") == session.created_at else 0
                if session.next_seq > indexed and self.settings[tenant].episodic:
                    catch_up.append((session, indexed))
                await asyncio.sleep(0)  # LMDB reads do not suspend: let requests in between sessions
        # In fleet mode the index is this replica's cache, never saved: built from the vectors.
        manifest = (await self.store.get_record(tenant, MANIFEST_KIND, MANIFEST_KEY) or {}) if self.fleet is None else {}
        mem.next_key = max(mem.next_key, int(manifest.get("next_key", 0)))
        _settle_heap()  # the decoded pages are gone: free them, and keep the index out of GC scans
        self.store.release_mapped_pages()  # and the LMDB pages they were read from
        self._opening.add(tenant)
        await self._ops.put(("open", tenant, manifest))
        log.info("memory: tenant %s: %d memories loaded from LMDB in %.0f ms", tenant, mem.alive, (time.perf_counter() - started) * 1000)
        self._queue_reembedding(tenant)
        if self.fleet is not None:  # owed to the fleet: indexed once, by whichever replica claims it
            await self.fleet.owe(tenant, catch_up)
            catch_up = []
        for session, indexed in catch_up:
            await self._catch_up(tenant, session, indexed)

    async def _load_records(self, tenant: str, session_id: str | None, sessions: dict[str, Any], model: str) -> None:
        """Load the memory records of a tenant (session_id None) or of one session, with their
        vectors, a page at a time: 100k records decoded at once would hold ~0.6 GB for a moment."""
        after = ""
        while page := await self.store.scan_records(tenant, KIND, session_id, after=after, limit=_LOAD_PAGE):
            vectors = await self._vector_records(tenant, session_id, after, page)
            after = page[-1][0]
            if len(page) == _LOAD_PAGE:  # a bulk read: its LMDB pages are not needed mapped
                self.store.release_mapped_pages()
            rows = [(session_id, value, vectors.get(key)) for key, value in page]
            memories, writes = await asyncio.to_thread(_decode_all, rows, sessions, model)
            if writes:  # orphans of sessions replaced meanwhile or rolled back, erased; old records split
                await self.store.apply([Write(tenant, records=writes)])
            for start in range(0, len(memories), 1000):
                self._insert_loaded(tenant, memories[start:start + 1000])
                await asyncio.sleep(0)

    async def _vector_records(self, tenant: str, session_id: str | None, after: str, page: list[tuple[str, Any]]) -> dict[str, Any]:
        """The vector records of the memories in ``page`` (keys after ``after``, up to its last):
        they are stored under the same keys, so one scan over the same range finds them."""
        last, found = page[-1][0], {}
        while True:
            rows = await self.store.scan_records(tenant, VECTOR_KIND, session_id, after=after, limit=len(page))
            for key, value in rows:
                if key > last:
                    return found
                found[key] = value
            if len(rows) < len(page) or rows[-1][0] == last:  # the range is done: no read past it
                return found
            after = rows[-1][0]

    def _insert_loaded(self, tenant: str, memories: list[Memory]) -> None:
        mem = self.memories[tenant]
        for memory in memories:
            if self.fleet is not None:
                memory.key = self._allocate_key(mem)  # keys are per replica in a fleet
            mem.insert(memory)
            if memory.type == PROCEDURAL:
                self._procedural[tenant][memory.id] = memory.text

    async def _catch_up(self, tenant: str, session: Any, indexed: int) -> None:
        """Index messages recorded but not yet remembered when the proxy last stopped."""
        everything = await self.store.get_messages(tenant, session.id)
        by_seq = {m.seq: m for m in everything}
        messages = [m for m in everything if m.seq >= indexed]
        if not messages:
            return
        user = self._user(self.settings[tenant], session.user_id)
        for message in messages:
            memory = _episodic(tenant, session.id, session.created_at, user, message, by_seq.get(message.parent))
            if memory is not None:
                self._jobs.put_nowait(_Job(tenant, memory, session.id, session.created_at))
        self._jobs.put_nowait(_Job(tenant, None, session.id, session.created_at, mark=max(m.seq for m in messages) + 1))

    # -- the indexer -------------------------------------------------------------------------

    async def _indexer(self) -> None:
        while True:
            jobs = [await self._jobs.get()]
            while len(jobs) < _INDEX_BATCH and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            try:
                by_tenant: dict[str, list[_Job]] = {}
                for job in jobs:
                    by_tenant.setdefault(job.tenant, []).append(job)
                for tenant, batch in by_tenant.items():
                    await self.ready[tenant].wait()
                    try:
                        await self._index(tenant, batch)
                    except Exception:
                        log.exception("memory: indexing %d items of tenant %s failed", len(batch), tenant)
            finally:
                for _ in jobs:
                    self._jobs.task_done()

    async def _index(self, tenant: str, jobs: list[_Job]) -> None:
        mem = self.memories[tenant]
        embedder = self._embedders[self._embedder_key(tenant)]
        if embedder.key in LOCAL_EMBEDDERS and embedder.index is None and embedder.error is None:
            with contextlib.suppress(asyncio.TimeoutError):  # the local model is still loading (~0.3 s)
                await asyncio.wait_for(embedder.ready.wait(), 30)
        reembed = [j.reembed for j in jobs if j.reembed]
        for memory_id in reembed:
            self._reembedding.discard(memory_id)
        fresh = {j.memory.id: j.memory for j in jobs if j.memory is not None and j.memory.id not in mem.ids}
        memories = list(fresh.values())  # a message queued twice (recorded during start-up) counts once
        for memory_id in reembed:
            slot = mem.ids.slot(memory_id)
            value = await self.store.get_record(tenant, KIND, memory_id, mem.where[slot][0]) if slot is not None else None
            if value is not None:
                memories.append(Memory.from_record(value, with_vector=False))
                memories[-1].key = int(mem.cols.ukey[slot])  # this index's key (a fleet's replicas each number their own)
        # Sessions must still exist (and be the same incarnation) before and after the write.
        sessions = {(j.session, j.created) for j in jobs if j.session is not None}
        gone = await self._gone(tenant, sessions)
        memories = [m for m in memories if (m.session, m.session_created) not in gone or m.session is None]
        if memories and embedder.index is not None:
            texts = [index_text(m)[:4000] for m in memories]
            try:
                vectors = []
                for start in range(0, len(texts), _INDEX_CHUNK):
                    vectors.extend(await embedder.index.embed_many(texts[start:start + _INDEX_CHUNK]))
                for memory, vector in zip(memories, vectors):
                    memory.vector, memory.model = vector, embedder.model_name
            except Exception as exc:
                self.counters[tenant]["embedder_errors"] += 1
                log.warning("memory: embedding %d memories of tenant %s failed (%s); stored lexically, retried later", len(texts), tenant, exc)
        for memory in memories:
            if memory.id not in mem.ids:
                memory.key = self._allocate_key(mem)
        records = [record for m in memories for record in m.records()]
        marks: dict[tuple[str, float | None], int] = {}
        for job in jobs:
            if job.mark is not None and job.session is not None and (job.session, job.created) not in gone:
                marks[(job.session, job.created)] = max(marks.get((job.session, job.created), 0), job.mark)
        records += [Record(MARK_KIND, MARK_KEY, {"next": mark, "created": created}, sid) for (sid, created), mark in marks.items()]
        await self._write(tenant, records)
        if self.fleet is not None and marks:
            await self.fleet.indexed(tenant, {sid: mark for (sid, _), mark in marks.items()})
        gone = await self._gone(tenant, sessions)
        if gone:  # deleted while we embedded: take back what we wrote for it
            await self.store.apply([Write(tenant, records=[Record(r.kind, r.key, None, r.session_id) for r in records
                                                           if r.session_id is not None and any(r.session_id == g[0] for g in gone)])])
            memories = [m for m in memories if (m.session, m.session_created) not in gone or m.session is None]
        new = [m for m in memories if m.id not in mem.ids]
        forgotten = self._sessions_forgotten
        for start in range(0, len(new), _INSERT_SLICE):
            if self._sessions_forgotten != forgotten:  # a session was erased while we yielded
                forgotten = self._sessions_forgotten
                gone = await self._gone(tenant, sessions)
                new = new[:start] + [m for m in new[start:] if (m.session, m.session_created) not in gone or m.session is None]
                memories = [m for m in memories if (m.session, m.session_created) not in gone or m.session is None]
            # Tokenizing and indexing take ~0.1 ms a memory: in slices, never one long stall
            # for the requests.
            self._insert(tenant, new[start:start + _INSERT_SLICE])
            await asyncio.sleep(0)
        keys, vectors = [], []
        for memory in memories:
            if memory.id in mem.ids and memory.vector is not None and memory.id in mem.unembedded:
                slot = mem.attach_vector(memory.id, memory.vector)
                if slot is not None:
                    keys.append(memory.key)
                    vectors.append(memory.vector)
        if keys:
            self._ops.put_nowait(("add", tenant, np.array(keys, dtype=np.uint64), np.stack(vectors)))
        self.counters[tenant]["indexed"] += len(new)

    async def _gone(self, tenant: str, sessions: set[tuple[str | None, float | None]]) -> set[tuple[str | None, float | None]]:
        gone = set()
        for sid, created in sessions:
            if sid is None:
                continue
            found = await self.store.get_session(tenant, sid)
            if found is not None and found.created_at != created:
                gone.add((sid, created))
            elif found is None:
                # A brand-new session may not be flushed yet when written behind; the write-behind
                # overlay answers for it, so None really means deleted.
                gone.add((sid, created))
        return gone

    # -- the index worker (every usearch change, one at a time) --------------------------------

    async def _index_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            op = await self._ops.get()
            try:
                await self._apply_op(loop, op)
            except Exception:
                log.exception("memory: index operation %s for tenant %s failed", op[0], op[1])
            finally:
                self._ops.task_done()

    async def _apply_op(self, loop: asyncio.AbstractEventLoop, op: tuple[Any, ...]) -> None:
        kind, tenant = op[0], op[1]
        mem = self.memories[tenant]
        if kind == "add":
            keys, vectors = op[2], op[3]
            if mem.vectors is None:
                if tenant in self._opening:
                    return  # the coming open/rebuild takes every vector from the copies
                mem.vectors = VectorIndex(vectors.shape[1], INDEX_DTYPE)
                mem.hnsw_ready = True
            alive = np.array([int(k) in mem.key_slot for k in keys], dtype=bool)
            if alive.any():
                await loop.run_in_executor(self._executor, mem.vectors.add, keys[alive], vectors[alive])
                self._dirty.add(tenant)
        elif kind == "remove":
            if mem.vectors is not None:
                await loop.run_in_executor(self._executor, mem.vectors.remove, op[2])
                self._dirty.add(tenant)
                mem_removed = self.counters[tenant]["index_removed"] = self.counters[tenant]["index_removed"] + len(op[2])
                if mem_removed > 1000 and mem_removed * 3 > len(mem.vectors):
                    self.counters[tenant]["index_removed"] = 0
                    await self._rebuild(loop, tenant)
        elif kind == "open":
            try:
                await self._open(loop, tenant, op[2])
            finally:
                self._opening.discard(tenant)
        elif kind == "save":
            when_quiet = len(op) > 2 and op[2]
            if not when_quiet or priority.activity.quiet_for(_SAVE_QUIET):
                await self._save(loop, tenant)
            # else a request came in meanwhile: still dirty, the next quiet moment saves it
        elif kind == "rebuild":
            await self._rebuild(loop, tenant)

    def _index_path(self, tenant: str) -> Path:
        return self.index_dir / f"{tenant}.usearch"

    async def _open(self, loop: asyncio.AbstractEventLoop, tenant: str, manifest: dict[str, Any]) -> None:
        """Use the saved index if it is intact and fits; reconcile it with LMDB; else rebuild."""
        mem = self.memories[tenant]
        if mem.mirror is None:
            mem.hnsw_ready = True  # nothing to index yet; the first vectors create the index
            return
        path = self._index_path(tenant)
        index = None
        if manifest.get("digest") and manifest.get("model") == self._model_name(tenant) and manifest.get("dim") == mem.mirror.dim:
            try:
                index = await loop.run_in_executor(self._file_executor, VectorIndex.load, path, manifest["digest"], mem.mirror.dim, INDEX_DTYPE)
            except IndexFileError as exc:
                log.warning("memory: index of tenant %s unusable (%s); rebuilding from LMDB", tenant, exc)
                self.counters[tenant]["index_rebuilds"] += 1
        elif path.exists():
            log.warning("memory: index of tenant %s does not match its manifest; rebuilding from LMDB", tenant)
            self.counters[tenant]["index_rebuilds"] += 1
        if index is None:
            await self._rebuild(loop, tenant)
            return
        present = set(int(k) for k in await loop.run_in_executor(self._executor, index.keys))
        mem.next_key = max([mem.next_key] + [k + 1 for k in present])  # keys in the file are never reused
        wanted = {int(mem.cols.ukey[s]): s for s in mem.key_slot.values() if mem.mirror is not None and s in mem.mirror}
        extra = present - set(wanted)
        missing = [k for k in wanted if k not in present]
        if len(missing) > max(1000, len(wanted) // 2):
            await self._rebuild(loop, tenant)
            return
        if extra:
            await loop.run_in_executor(self._executor, index.remove, extra)
        if missing:
            vectors = mem.mirror.vectors(np.array([wanted[k] for k in missing], dtype=np.int64))
            await loop.run_in_executor(self._executor, index.add, np.array(missing, dtype=np.uint64), vectors)
        mem.vectors, mem.hnsw_ready = index, True
        if extra or missing:
            self._dirty.add(tenant)
            self.counters[tenant]["index_reconciled"] += len(extra) + len(missing)
        log.info("memory: index of tenant %s loaded (%d vectors; %d stale removed, %d added)", tenant, len(index), len(extra), len(missing))

    async def _rebuild(self, loop: asyncio.AbstractEventLoop, tenant: str) -> None:
        mem = self.memories[tenant]
        mem.hnsw_ready = False  # exact search over the copies meanwhile
        if mem.mirror is None:
            mem.vectors, mem.hnsw_ready = None, True
            return
        started = time.perf_counter()
        index = VectorIndex(mem.mirror.dim, INDEX_DTYPE)
        slots = [s for s in list(mem.key_slot.values()) if s in mem.mirror]
        for start in range(0, len(slots), 512):
            chunk = [s for s in slots[start:start + 512] if mem.cols.alive[s] and s in mem.mirror]
            if not chunk:
                continue
            keys = mem.cols.ukey[chunk].astype(np.uint64)
            vectors = mem.mirror.vectors(np.array(chunk, dtype=np.int64))  # released ones in one read of the index
            await loop.run_in_executor(self._executor, index.add, keys, vectors)
        # Vectors added or removed while we built are applied by the ops queued behind us;
        # removals that happened meanwhile are settled here.
        dead = [int(k) for k in await loop.run_in_executor(self._executor, index.keys) if int(k) not in mem.key_slot]
        if dead:
            await loop.run_in_executor(self._executor, index.remove, dead)
        mem.vectors, mem.hnsw_ready = index, True
        self._dirty.add(tenant)
        release_freed_memory()  # the build's buffers
        log.info("memory: index of tenant %s rebuilt from LMDB: %d vectors in %.1f s", tenant, len(index), time.perf_counter() - started)

    async def _save(self, loop: asyncio.AbstractEventLoop, tenant: str) -> None:
        mem = self.memories[tenant]
        if self.fleet is not None:  # a fleet's index is a cache, rebuilt at start (fleet_sync.py)
            self._dirty.discard(tenant)
            return
        if mem.vectors is None or not mem.hnsw_ready:
            return
        self._dirty.discard(tenant)
        digest = await loop.run_in_executor(self._file_executor, mem.vectors.save, self._index_path(tenant))
        manifest = {"digest": digest, "model": self._model_name(tenant), "dim": mem.vectors.dim, "dtype": mem.vectors.dtype,
                    "next_key": mem.next_key, "count": len(mem.vectors), "saved_at": time.time()}
        await self.store.apply([Write(tenant, records=[Record(MANIFEST_KIND, MANIFEST_KEY, manifest)])])

    # -- maintenance -------------------------------------------------------------------------

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(self.save_interval)
            await self.save_when_quiet()

    async def save_when_quiet(self, within: float = _SAVE_MAX_WAIT) -> None:
        """Queue a save of every changed index once no request has been in flight for a
        while, or after ``within`` seconds regardless."""
        if self._dirty:
            quiet = await priority.activity.quiet(_SAVE_QUIET, within=within)
            for tenant in list(self._dirty):
                self._ops.put_nowait(("save", tenant, quiet))  # if not quiet: saved now, regardless

    async def _maintenance(self) -> None:
        last_vacuum = time.monotonic()
        while True:
            await asyncio.sleep(min(self.save_interval, self.vacuum_interval))
            try:
                for tenant in self.settings:
                    self._queue_reembedding(tenant)  # memories stored while the embedder was down
                if time.monotonic() - last_vacuum >= self.vacuum_interval:
                    last_vacuum = time.monotonic()
                    for tenant in self.settings:
                        await self.vacuum(tenant)
            except Exception:
                log.exception("memory: maintenance failed")

    def _queue_reembedding(self, tenant: str, limit: int = 2000) -> None:
        if self._embedders[self._embedder_key(tenant)].index is None and self._embedders[self._embedder_key(tenant)].error:
            return  # still down: the next round tries again
        for memory_id in list(self.memories[tenant].unembedded - self._reembedding)[:limit]:
            self._reembedding.add(memory_id)
            self._jobs.put_nowait(_Job(tenant, None, reembed=memory_id))

    async def vacuum(self, tenant: str) -> int:
        """Forget memories of sessions that no longer exist (deleted by any path) or were rolled back."""
        mem = self.memories[tenant]
        doomed: list[str] = []
        for code, (sid, created) in enumerate(list(mem.session_ids)):
            slots = mem.session_slots.get(code)
            if not slots:
                continue
            if code % 32 == 31:
                await asyncio.sleep(0)  # session reads from LMDB do not suspend: let requests in
            session = await self.store.get_session(tenant, sid)
            if session is None or session.created_at != created:
                doomed += [mem.ids[s] for s in slots if mem.ids[s]]
                continue
            reverted = _reverted(session)
            if reverted:
                for slot in list(slots):
                    memory_id = mem.ids[slot]
                    if memory_id and int(mem.cols.seq[slot]) in reverted:
                        doomed.append(memory_id)
        if doomed:
            self._forget(tenant, doomed)
        return len(doomed)


def _percentiles(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p99": None}
    return {"count": len(ordered), "p50": round(ordered[len(ordered) // 2], 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)}


def _settle_heap() -> None:
    """After loading a tenant's memory: collect the garbage of the load, then freeze what is
    left, which is mostly the index (100k-entry dicts and lists that live as long as the
    process): the collector stops traversing them, and a full collection in a busy proxy took
    70-110 ms (benchmark p99) while they were tracked. Freed heap goes back to the OS."""
    gc.collect()
    gc.freeze()
    release_freed_memory()


def _episodic(tenant: str, session: str, created: float, user: str | None, message: Message, parent: Message | None = None) -> Memory | None:
    if message.role not in ("user", "assistant") or message.reverted:
        return None
    if message.role == "assistant" and message.outcome == "error":
        return None
    text = message_text(message.body)
    if not text:
        return None
    name = message.body.get("name") if isinstance(message.body.get("name"), str) else None
    context = None
    if parent is not None and parent.role in ("user", "assistant"):
        previous = message_text(parent.body)
        if previous:
            context = previous if len(previous) <= _CONTEXT_CHARS else "…" + previous[-_CONTEXT_CHARS:]
            if isinstance(parent.body.get("name"), str):
                context = f"{parent.body['name']}: {context}"
    return Memory(id=episodic_id(tenant, session, created, message.seq), type=EPISODIC, text=text[:MAX_TEXT], ts=message.ts,
                  key=-1, user=user, session=session, session_created=created, seq=message.seq, role=message.role, name=name,
                  context=context)


def _decode_all(rows: list[tuple[str | None, dict[str, Any], dict[str, Any] | None]], sessions: dict[str, Any],
                model: str) -> tuple[list[Memory], list[Record]]:
    """Decode stored memories (worker thread): rows of (session, record, vector record). Also
    returns the writes to make: erasing those that must not survive, and splitting records of
    before 2026-11-26, which held their vector, into a record and a vector record."""
    memories, writes = [], []
    reverted_of: dict[str, set[int]] = {}
    for sid, value, vector in rows:
        try:
            memory = Memory.from_record(value, vector_value=vector)
        except (ValueError, KeyError, TypeError):
            log.error("memory: undecodable memory record %r skipped", value.get("id") if isinstance(value, dict) else None)
            continue
        if sid is not None:
            session = sessions.get(sid)
            if sid not in reverted_of and session is not None:
                reverted_of[sid] = _reverted(session)
            if session is None or session.created_at != memory.session_created or (memory.seq is not None and memory.seq in reverted_of.get(sid, set())):
                writes += Memory.erasure(memory.id, sid)
                continue
        if vector is None and ("vec16" in value or "vec" in value):
            writes.append(Record(KIND, memory.id, {k: v for k, v in value.items() if k not in ("vec16", "vec")}, sid))
            writes.append(Record(VECTOR_KIND, memory.id, {k: value[k] for k in ("model", "vec16", "vec") if k in value}, sid))
        if memory.model != model:
            memory.vector, memory.model = None, None  # another embedder's vector: re-embedded later
        memories.append(memory)
    return memories, writes


def _reverted(session: Any) -> set[int]:
    return {int(seq) for entry in (session.extra or {}).get("rollbacks", []) if isinstance(entry, dict)
            for seq in entry.get("reverted", []) if isinstance(seq, int)}


def _visible(scope: Scope, memory: Memory) -> bool:
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


def _shorten(query: str) -> str:
    """What of a query is embedded: all of a short one, head and tail of a long one (BM25 sees it all)."""
    if len(query) <= _QUERY_CHARS:
        return query
    return query[: _QUERY_CHARS * 2 // 3] + " … " + query[-_QUERY_CHARS // 3:]


def _recall_for(mem: TenantMemory, query: str) -> str | None:
    """What a recall does for ``query``: "search", skip it as "small talk" (nothing beyond
    greetings and thanks), or None (no query, or no memories to search besides procedures)."""
    if not query or mem.alive - sum(len(v) for v in mem.procedural.values()) <= 0:
        return None
    return "search" if lexical.has_content(query) else "small talk"


def _query_text(messages: list[Any]) -> str:
    """What to recall for: the newest user message."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""
