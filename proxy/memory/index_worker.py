"""The index worker: every change to a tenant's usearch index, one at a time, in queue order,
on one writer thread; and the index file: open and reconcile with LMDB, rebuild, save (in fleet
mode with the replica's own manifest, proxy/memory/fleet_index.py, instead of LMDB's).

Other parts never touch an index: they queue typed ops (``proxy/memory/ops.py``), mostly
through ``TenantState.insert``/``forget``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from proxy import priority
from proxy.idle_gc import release_freed_memory
from proxy.memory.fleet_index import ReplicaFiles, SavedIndex
from proxy.memory.ids import MemoryIds
from proxy.memory.ops import AddVectors, IndexOp, OpenIndex, RebuildIndex, RemoveVectors, SaveIndex
from proxy.memory.state import TenantState
from proxy.memory.vectors import IndexFileError, VectorIndex
from proxy.storage.base import Record, Store, Write

log = logging.getLogger("agent_state_proxy.memory")

MANIFEST_KIND, MANIFEST_KEY = "memory_index", "manifest"  # tenant-wide: what the index file holds
INDEX_DTYPE = "i8"
SAVE_QUIET = 0.5  # seconds without requests a save waits for (usearch holds the GIL while it writes)
_REBUILD_CHUNK = 512
_VERIFY_CHUNK = 4096  # vectors compared at a time when a fleet replica reuses its saved index
_SAME_VECTOR = 0.95  # cosine between the file's and PostgreSQL's vector of one key (the same int8 codes when they match)


class IndexWorker:
    def __init__(self, tenants: Mapping[str, TenantState], ops: asyncio.Queue[IndexOp], store: Store, index_dir: Path) -> None:
        self.tenants, self.ops, self.store, self.index_dir = tenants, ops, store, Path(index_dir)
        self.dtype = INDEX_DTYPE
        self.saves = True  # False: never saved (a fleet replica whose index_dir another process holds)
        # Fleet mode: the replica's own files and manifests, and the change-log number each
        # tenant's cache has applied (FleetSync.cursors.get).
        self.files: ReplicaFiles | None = None
        self.cursor: Callable[[str], int | None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-index", initializer=priority.background_thread)
        # usearch holds the GIL for a whole save or load (docs/MEMORY.md): not on a
        # SCHED_IDLE thread, which could be preempted holding it (proxy/priority.py).
        self._file_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-index-file", initializer=priority.low_priority_thread)

    async def run(self) -> None:
        while True:
            op = await self.ops.get()
            try:
                await self.apply(op)
            except Exception:
                log.exception("memory: index operation %s for tenant %s failed", type(op).__name__, op.tenant)
            finally:
                self.ops.task_done()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        self._file_executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def apply(self, op: IndexOp) -> None:
        state = self.tenants[op.tenant]
        mem = state.memory
        match op:
            case AddVectors(keys=keys, vectors=vectors):
                if mem.vectors is None:
                    if state.opening:
                        return  # the coming open/rebuild takes every vector from the copies
                    mem.vectors = VectorIndex(vectors.shape[1], self.dtype)
                    mem.hnsw_ready = True
                alive = np.array([int(k) in mem.key_slot for k in keys], dtype=bool)
                if alive.any():
                    await self._run(mem.vectors.add, keys[alive], vectors[alive])
                    state.dirty = True
            case RemoveVectors(keys=keys):
                if mem.vectors is not None:
                    await self._run(mem.vectors.remove, keys)
                    state.dirty = True
                    removed = state.counters["index_removed"] = state.counters["index_removed"] + len(keys)
                    if removed > 1000 and removed * 3 > len(mem.vectors):
                        state.counters["index_removed"] = 0
                        await self.rebuild(state)
            case OpenIndex(manifest=manifest):
                try:
                    await self.open(state, manifest)
                finally:
                    state.opening = False
            case SaveIndex(when_quiet=when_quiet):
                if not when_quiet or priority.activity.quiet_for(SAVE_QUIET):
                    await self.save(state)
                # else a request came in meanwhile: still dirty, the next quiet moment saves it
            case RebuildIndex():
                await self.rebuild(state)

    def path(self, tenant: str) -> Path:
        return self.files.index_path(tenant) if self.files is not None else self.index_dir / f"{tenant}.usearch"

    async def open(self, state: TenantState, manifest: dict[str, Any]) -> None:
        """Use the saved index if it is intact and fits; reconcile it with the loaded memories
        (from LMDB, or a fleet replica's from PostgreSQL); else rebuild."""
        tenant, mem = state.name, state.memory
        if mem.mirror is None:
            mem.hnsw_ready = True  # nothing to index yet; the first vectors create the index
            return
        path = self.path(tenant)
        index = None
        if manifest.get("digest") and manifest.get("model") == state.model_name and manifest.get("dim") == mem.mirror.dim:
            try:
                index = await asyncio.get_running_loop().run_in_executor(
                    self._file_executor, VectorIndex.load, path, manifest["digest"], mem.mirror.dim, self.dtype)
            except IndexFileError as exc:
                log.warning("memory: index of tenant %s unusable (%s); rebuilding it", tenant, exc)
                state.counters["index_rebuilds"] += 1
        elif path.exists() and (self.files is None or manifest.get("digest")):  # else a fleet replica's loader said why
            log.warning("memory: index of tenant %s does not match its manifest; rebuilding it", tenant)
            state.counters["index_rebuilds"] += 1
        if index is None:
            await self.rebuild(state)
            return
        present = set(int(k) for k in await self._run(index.keys))
        mem.next_key = max([mem.next_key] + [k + 1 for k in present])  # keys in the file are never reused
        wanted = {int(mem.cols.ukey[s]): s for s in mem.key_slot.values() if mem.mirror is not None and s in mem.mirror}
        extra = present - set(wanted)
        missing = [k for k in wanted if k not in present]
        if len(missing) > max(1000, len(wanted) // 2):
            await self.rebuild(state)
            return
        if manifest.get("verify") and not await self._same_vectors(state, index, wanted, present):
            log.warning("memory: saved index of tenant %s holds other vectors than PostgreSQL for some memories; rebuilding it", tenant)
            state.counters["index_rebuilds"] += 1
            await self.rebuild(state)
            return
        if extra:
            await self._run(index.remove, extra)
        if missing:
            vectors = mem.mirror.vectors(np.array([wanted[k] for k in missing], dtype=np.int64))
            await self._run(index.add, np.array(missing, dtype=np.uint64), vectors)
        mem.vectors, mem.hnsw_ready = index, True
        state.counters["index_loaded"] += 1
        if extra or missing:
            state.dirty = True
            state.counters["index_reconciled"] += len(extra) + len(missing)
        log.info("memory: index of tenant %s loaded (%d vectors; %d stale removed, %d added)", tenant, len(index), len(extra), len(missing))

    async def _same_vectors(self, state: TenantState, index: VectorIndex, wanted: dict[int, int], present: set[int]) -> bool:
        """Whether every key the saved file and the loaded memories share holds the memory's
        vector (a fleet replica's keys come from its own manifest: a check that it matches)."""
        mem = state.memory
        shared = [key for key in wanted if key in present]
        for start in range(0, len(shared), _VERIFY_CHUNK):
            keys = [k for k in shared[start:start + _VERIFY_CHUNK] if mem.key_slot.get(k) == wanted[k] and wanted[k] in mem.mirror]
            if not keys:
                continue  # forgotten meanwhile: their keys are removed by the ops behind this one
            expected = mem.mirror.vectors(np.array([wanted[k] for k in keys], dtype=np.int64))  # on the loop, before it changes
            found = await self._run(index.vectors, np.array(keys, dtype=np.uint64))
            norms = np.linalg.norm(expected, axis=1)
            cosines = np.einsum("ij,ij->i", found, expected) / np.where(norms > 0, norms, 1)
            if (cosines[norms > 0] < _SAME_VECTOR).any():
                return False
        return True

    async def rebuild(self, state: TenantState) -> None:
        mem = state.memory
        mem.hnsw_ready = False  # exact search over the copies meanwhile
        if mem.mirror is None:
            mem.vectors, mem.hnsw_ready = None, True
            return
        started = time.perf_counter()
        index = VectorIndex(mem.mirror.dim, self.dtype)
        slots = [s for s in list(mem.key_slot.values()) if s in mem.mirror]
        for start in range(0, len(slots), _REBUILD_CHUNK):
            chunk = [s for s in slots[start:start + _REBUILD_CHUNK] if mem.cols.alive[s] and s in mem.mirror]
            if not chunk:
                continue
            keys = mem.cols.ukey[chunk].astype(np.uint64)
            vectors = mem.mirror.vectors(np.array(chunk, dtype=np.int64))  # released ones in one read of the index
            await self._run(index.add, keys, vectors)
        # Vectors added or removed while we built are applied by the ops queued behind us;
        # removals that happened meanwhile are settled here.
        dead = [int(k) for k in await self._run(index.keys) if int(k) not in mem.key_slot]
        if dead:
            await self._run(index.remove, dead)
        mem.vectors, mem.hnsw_ready = index, True
        state.dirty = True
        release_freed_memory()  # the build's buffers
        log.info("memory: index of tenant %s rebuilt from LMDB: %d vectors in %.1f s", state.name, len(index), time.perf_counter() - started)

    async def save(self, state: TenantState) -> None:
        mem = state.memory
        if not self.saves:
            state.dirty = False
            return
        if mem.vectors is None or not mem.hnsw_ready:
            return
        if self.files is not None:
            await self._save_replica(state, self.files)
            return
        state.dirty = False
        digest = await asyncio.get_running_loop().run_in_executor(self._file_executor, mem.vectors.save, self.path(state.name))
        manifest = {"digest": digest, "model": state.model_name, "dim": mem.vectors.dim, "dtype": mem.vectors.dtype,
                    "next_key": mem.next_key, "count": len(mem.vectors), "saved_at": time.time()}
        await self.store.apply([Write(state.name, records=[Record(MANIFEST_KIND, MANIFEST_KEY, manifest)])])

    async def _save_replica(self, state: TenantState, files: ReplicaFiles) -> None:
        """Fleet mode: the index file, then the replica's manifest. The key map and the cursor
        are taken together, before the file is written: the file holds what every op queued
        before this save did (ops queued behind it wait), so a key the map has that the file
        lacks is added at the next start, a key the file has that the map lacks is removed, and
        every change after the cursor is re-keyed."""
        mem = state.memory
        cursor = self.cursor(state.name) if self.cursor is not None else None
        if cursor is None or mem.vectors is None or mem.mirror is None:
            return  # not loaded from the change log (yet): nothing this file could be matched with
        state.dirty = False
        slots = mem.key_slot.array()
        ids, labels = mem.ids.column(slots), mem.cols.ukey[slots]  # copies: decoded off the loop
        index, next_key, dim, model = mem.vectors, mem.next_key, mem.mirror.dim, state.model_name

        def write(digest: str) -> None:
            keys = dict(zip(MemoryIds.decoded(ids), labels.tolist()))
            files.write(state.name, SavedIndex(digest, model, dim, index.dtype, cursor, next_key, keys))

        loop = asyncio.get_running_loop()
        digest = await loop.run_in_executor(self._file_executor, index.save, files.index_path(state.name))
        await loop.run_in_executor(self._file_executor, write, digest)
        state.counters["index_saved"] += 1
