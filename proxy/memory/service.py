"""Long-term memory of every tenant: remember recorded messages and API-added memories, recall
the relevant ones for a request within its latency budget, keep LMDB and the index in step.

LMDB is the source of truth: each memory is a Record (kind ``memory``) holding its text and
metadata, and once embedded a second one (kind ``memory_vector``, same key) holding its vector;
memories of a session are session-scoped records, so whatever erases a session erases them in
the same transaction. The in-memory structures (BM25, vector copies, the usearch index) are
rebuilt or reconciled from LMDB at start-up, in the background.

``MemoryService`` is the facade the rest of the proxy uses. It builds one ``TenantState`` per
tenant and wires the parts, each in its own module, dependencies one way:

    service → api → recall, indexer, index_worker → state → tenant (structures), embedders
    service → loader → indexer, index_worker

and owns the background tasks, one of each per process:
* the indexer embeds and stores new memories (never on the request path);
* the index worker applies every usearch change, one at a time, on one thread;
* maintenance re-embeds what was stored without a vector and drops memories of sessions that
  are gone; the saver saves changed indexes when no request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from proxy import priority
from proxy.config import MemorySettings, TenantConfig
from proxy.jobs import Claims
from proxy.memory.api import MemoryApi
from proxy.memory.embedder_slots import EmbedderSlot, embedder_key, init_embedder, model_name
from proxy.memory.fleet_index import ReplicaFiles
from proxy.memory.fleet_sync import FleetSync
from proxy.memory.index_worker import SAVE_QUIET, IndexWorker
from proxy.memory.indexer import Indexer
from proxy.memory.learning import Learning
from proxy.memory.loader import Loader
from proxy.memory.model import SEMANTIC, Memory, Scope
from proxy.memory.ops import IndexOp, SaveIndex
from proxy.memory.recall import QueryEmbedding, Recall, Recaller
from proxy.memory.state import TenantState
from proxy.memory.tenant import Hit
from proxy.records import Message
from proxy.storage.base import Store
from proxy.upstream import Upstream

__all__ = ["MemoryService", "QueryEmbedding", "Recall"]

log = logging.getLogger("agent_state_proxy.memory")

_SAVE_MAX_WAIT = 600.0  # a never-quiet proxy still saves after this long
_RELOADED = ("extract", "extractor_model", "backfill_per_minute")  # memory settings a reload applies at once


class MemoryService:
    def __init__(self, store: Store, upstream: Upstream, tenants: Iterable[TenantConfig], index_dir: Path, *,
                 save_interval: float = 60.0, vacuum_interval: float = 120.0, claims: Claims | None = None) -> None:
        self.store, self.upstream = store, upstream
        self.save_interval, self.vacuum_interval = save_interval, vacuum_interval
        claims = claims or Claims()  # background work that runs on one replica at a time
        self.ops: asyncio.Queue[IndexOp] = asyncio.Queue()
        self.embedders: dict[str, EmbedderSlot] = {}
        self.tenants: dict[str, TenantState] = {}
        for config in tenants:
            if not config.memory.enabled or config.stateless:
                continue
            key = embedder_key(config.name, config.memory)
            slot = self.embedders.setdefault(key, EmbedderSlot(key, model_name(config)))
            self.tenants[config.name] = TenantState(config.name, config.memory, config, slot, self.ops)
        # The tenants whose memory runs (a reload that enables it for another waits for a restart).
        self.settings: dict[str, MemorySettings] = {name: state.settings for name, state in self.tenants.items()}
        self.worker = IndexWorker(self.tenants, self.ops, store, index_dir)
        self.indexer = Indexer(self.tenants, store, claims)
        # Fleet mode (PostgreSQL, replicas: many): the indexes are caches that follow PostgreSQL.
        self.fleet = FleetSync.of(self.tenants, store, self.indexer)
        if self.fleet is not None:
            self._replica_files(ReplicaFiles(index_dir))
            self.indexer.on_marked = self.fleet.indexed
            for state in self.tenants.values():
                state.fleet = True
        self.loader = Loader(store, self.indexer, self.fleet)
        self.recaller = Recaller(self.tenants, store)
        self.api = MemoryApi(self.tenants, store, self.recaller, self.indexer, self.worker)
        # extraction, supersession, expiry (docs/MEMORY_LEARNING.md); claims: each session's
        # extraction runs on one replica at a time
        self.learning = Learning(self, claims)
        self._tasks: list[asyncio.Task[Any]] = []

    def _replica_files(self, files: ReplicaFiles) -> None:
        """Fleet mode: the index is saved in this replica's own index_dir with its key map and
        change-log cursor (proxy/memory/fleet_index.py), unless another process holds it."""
        assert self.fleet is not None
        if not files.claim():
            log.warning("memory: %s is used by another process (two replicas with one data_dir?): this replica neither loads nor "
                        "saves its index there and rebuilds it at every start; give each replica its own data_dir", files.index_dir)
            self.worker.saves = False
            return
        self.worker.files = self.fleet.files = files
        self.worker.cursor = self.fleet.cursors.get

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Schedule loading in the background and return at once (start-up stays fast)."""
        if not self.tenants:
            return
        started: set[str] = set()
        for state in self.tenants.values():
            slot = state.embedder
            if slot.key not in started:
                started.add(slot.key)
                self._spawn(init_embedder(slot, state.config, self.upstream, self._embed_what_waited), f"memory-embedder-{slot.key}")
        for state in self.tenants.values():
            self._spawn(self.loader.load(state), f"memory-load-{state.name}")
        self._spawn(self.indexer.run(), "memory-indexer")
        self._spawn(self.worker.run(), "memory-index-worker")
        self._spawn(self._maintenance(), "memory-maintenance")
        self._spawn(self._saver(), "memory-saver")
        self.learning.start()
        if self.fleet is not None:
            self._tasks += self.fleet.start()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def loaded(self) -> None:
        """Wait until every tenant's memories are loaded from LMDB (searchable, lexically at least)."""
        for state in self.tenants.values():
            await state.ready.wait()

    async def close(self, drain_timeout: float = 3.0) -> None:
        """Finish queued indexing (briefly: what is left is caught up at the next start from the
        transcripts), save changed indexes, stop the workers."""
        await self.learning.backfill.close()  # first: no new run starts while the rest drains
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.drain(), drain_timeout)
        await self.learning.close()
        for state in self.tenants.values():
            if state.dirty:
                await self.ops.put(SaveIndex(state.name))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ops.join(), 20.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.fleet is not None:
            await self.fleet.close()
        for embedder in self.embedders.values():
            await embedder.close()
        self.worker.shutdown()
        if self.worker.files is not None:
            self.worker.files.release()

    async def drain(self) -> None:
        """Wait until every queued memory is indexed and every index change applied (tests, benchmarks)."""
        await self.loaded()
        await self.indexer.jobs.join()
        await self.learning.drain()
        await self.ops.join()

    # -- the request path --------------------------------------------------------------------

    def embed_query(self, tenant: str, body: dict[str, Any]) -> QueryEmbedding | None:
        """Start embedding what the request will recall for, as soon as it is parsed: the
        embedding is the slowest step of a recall, so whatever runs before it (loading the
        session, reconciling its history) would add to the request. None when there will be no
        recall (or no vector to wait for). Hand it to ``begin_recall``, or cancel it."""
        return self.recaller.embed_query(tenant, body)

    def begin_recall(self, turn: Any, early: QueryEmbedding | None = None) -> Recall | None:
        """Start recalling for this request; None when there is nothing to recall.

        The query embedding starts now on the embedder's thread (or was started by
        ``embed_query``: ``early``, taken over here), so the caller can assemble the context
        meanwhile (keeping ``Recall.room`` tokens free for the memory block); ``finish_recall``
        then searches and adds the memories to the system prompt.
        """
        return self.recaller.begin_recall(turn, early)

    async def finish_recall(self, turn: Any, recall: Recall) -> None:
        """Search, read back and inject the memories; sets ``turn.injected`` (recorded on the
        answer) and the X-Memory-* response headers. The whole recall, embedding included,
        stays within the tenant's latency budget."""
        await self.recaller.finish_recall(turn, recall)

    async def after_record(self, turn: Any, messages: list[Message]) -> None:
        """Queue the recorded user and assistant messages for indexing (the work is done later)."""
        state = self.tenants.get(turn.tenant.name)
        if state is not None:
            self.learning.after_record(turn, messages)  # extraction, later, in the background
        if state is None or not state.settings.episodic or not messages:
            return
        user = state.user(turn.ref.user_id or turn.session.user_id)
        await self.indexer.queue_messages(state, turn.session, user, messages, getattr(turn.plan, "parent", None))

    # -- the memories API --------------------------------------------------------------------

    async def add(self, tenant: str, content: str, type: str = SEMANTIC, user: str | None = None,
                  session: str | None = None, metadata: dict[str, Any] | None = None) -> Memory:
        return await self.api.add(tenant, content, type, user, session, metadata)

    async def get(self, tenant: str, memory_id: str) -> Memory:
        return await self.api.get(tenant, memory_id)

    async def list(self, tenant: str, *, type: str | None = None, user: str | None = None, session: str | None = None,
                   limit: int = 100, after: str | None = None) -> tuple[list[Memory], bool]:
        return await self.api.list(tenant, type=type, user=user, session=session, limit=limit, after=after)

    async def search(self, tenant: str, query: str, scope: Scope, *, top_k: int, types: Iterable[str],
                     min_score: float | None = None) -> tuple[list[tuple[Memory, Hit]], str | None]:
        return await self.api.search(tenant, query, scope, top_k=top_k, types=types, min_score=min_score)

    async def delete(self, tenant: str, memory_id: str) -> None:
        await self.api.delete(tenant, memory_id)

    async def forget_session(self, tenant: str, session_id: str) -> int:
        return await self.api.forget_session(tenant, session_id)

    async def forget_messages(self, tenant: str, session_id: str, seqs: Iterable[int]) -> int:
        seqs = set(seqs)
        await self.learning.forget_reverted(tenant, session_id, seqs)  # what was extracted from them
        return await self.api.forget_messages(tenant, session_id, seqs)

    async def vacuum(self, tenant: str) -> int:
        return await self.api.vacuum(tenant)

    def stats(self, tenant: str) -> dict[str, Any]:
        stats = self.api.stats(tenant)
        if tenant in self.tenants:
            stats["backfill"] = self.learning.backfill.stats(tenant)  # null: none has run since start
        return stats

    def reconfigure(self, tenants: Iterable[TenantConfig]) -> None:
        """After a configuration reload: the tenants whose memory runs take the new extraction
        settings (and the new routes of their extractor model); the rest of the memory settings
        change at the next restart."""
        turned_on = []
        for config in tenants:
            state = self.tenants.get(config.name)
            if state is None or not config.memory.enabled or config.stateless:
                continue
            was = state.settings.extract and state.settings.backfill_per_minute > 0
            state.settings = state.settings.model_copy(update={key: getattr(config.memory, key) for key in _RELOADED})
            state.config = config
            self.settings[config.name] = state.settings
            if not was and state.settings.extract and state.settings.backfill_per_minute > 0:
                turned_on.append(config.name)
        self.learning.turned_on(turned_on)

    # -- background --------------------------------------------------------------------------

    def _embed_what_waited(self, slot: EmbedderSlot) -> None:
        """Memories accepted while this embedder was loading (or down) are embedded now, not at
        the next maintenance round: until then a search by meaning cannot find them."""
        for state in self.tenants.values():
            if state.embedder is slot and state.ready.is_set():
                self.indexer.queue_reembedding(state)

    async def save_when_quiet(self, within: float = _SAVE_MAX_WAIT) -> None:
        """Queue a save of every changed index once no request has been in flight for a
        while, or after ``within`` seconds regardless."""
        if any(state.dirty for state in self.tenants.values()):
            quiet = await priority.activity.quiet(SAVE_QUIET, within=within)
            for state in self.tenants.values():
                if state.dirty:
                    self.ops.put_nowait(SaveIndex(state.name, when_quiet=quiet))  # if not quiet: saved now, regardless

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(self.save_interval)
            await self.save_when_quiet()

    async def _maintenance(self) -> None:
        last_vacuum = time.monotonic()
        while True:
            await asyncio.sleep(min(self.save_interval, self.vacuum_interval))
            try:
                for state in self.tenants.values():
                    self.indexer.queue_reembedding(state)  # memories stored while the embedder was down
                if time.monotonic() - last_vacuum >= self.vacuum_interval:
                    last_vacuum = time.monotonic()
                    for tenant in self.tenants:
                        await self.vacuum(tenant)
            except Exception:
                log.exception("memory: maintenance failed")
