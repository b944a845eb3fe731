"""The LMDB backend: durable, transactional, one environment per process.

Writes run on one dedicated thread (LMDB has a single writer anyway), so an fsync never
blocks the event loop; reads run inline on the caller's thread, they take microseconds.

LMDB copies on write: a commit writes each page it changed to a free place in the file, and
the next read maps that copy. So the file's pages mapped in this process (its RSS) grow by
about what it writes, nearly all of them copies that later commits have already replaced
(measured in the benchmark's full mode: +4 MB/s at ~70 req/s, never levelling off). The
writer thread therefore drops the mapping every ``release_interval`` seconds while it writes
(see proxy/storage/mapped.py): the page cache keeps the pages, and the few still in use are
mapped again by the next reads, a minor fault each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from proxy.storage import mapped
from proxy.storage.base import REPAIR_HINT, StorageError, StoreDamaged
from proxy.storage.kv import KVStore

log = logging.getLogger("agent_state_proxy.storage")
T = TypeVar("T")

# LMDB errors that mean the file's structure is damaged (a page of the wrong type, a page number
# beyond the file, not an LMDB file, a fatal environment error), as opposed to a failed write.
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError)
# Keys read per transaction by the structural scan: each chunk holds the read lock (which every
# read takes) for ~2 ms, so a request waits at most that long behind the background scan.
SCAN_CHUNK = 2_000

_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


class _LmdbTxn:
    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def get(self, key: bytes) -> bytes | None:
        value = self._txn.get(key)
        return bytes(value) if value is not None else None

    def put(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value)

    def delete(self, key: bytes) -> None:
        self._txn.delete(key)

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor()
        if not cursor.set_range(max(prefix, start or prefix)):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield bytes(key), bytes(value)


# Seconds between two drops of the mapped pages by the writer thread. A drop costs ~25 us per MB
# it drops, on that thread, without the GIL. Reads map more than they read (the kernel maps a
# page's cached neighbours too, up to its whole folio of the page cache: 64 KB to 2 MB), and a
# request's recall reads its memories from all over the file: sampled every 50 ms while serving
# (bench/full_probe.py), at most 19.6 MB were mapped with a drop every second, 6.2 MB at 0.25 s.
RELEASE_INTERVAL = 0.25
# A read of this many rows or more (a transcript read back, a scan) has its pages dropped at once,
# not at the next timed drop: the kernel maps each page's cached neighbours too, and a sweep over
# sessions whose transcripts are not cached mapped ~30 MB between two drops (bench/run.py).
BULK_READ_ROWS = 64


class LmdbStore(KVStore):
    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self._path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")
        self.release_interval = RELEASE_INTERVAL
        self._released_at = time.monotonic()
        self._release_queued = False
        # Growing the map (set_mapsize) is only safe while no transaction of this process is
        # open, so reads share this lock with the resize; uncontended it costs ~100 ns.
        self._resize_lock = threading.Lock()
        # Held while the map's address range is in use outside a transaction (dropping its
        # pages), so it cannot move meanwhile; reads go on.
        self._map_lock = threading.Lock()
        # Held by a backup copy (its own read transaction, for seconds): the map may not grow
        # meanwhile, but reads, writes and page drops go on.
        self._copy_lock = threading.Lock()
        self._mapped: list[tuple[int, int]] | None = None  # the data file's address ranges
        self._closed = False
        self._damage: str | None = None  # set by the first structural error seen; never cleared

    @classmethod
    def open(cls, path: str, map_size: int = 1 << 30, max_readers: int = 126) -> LmdbStore:
        """Open (creating) the environment at ``path``. LMDB allows one per path per process."""
        real = os.path.realpath(path)
        with _open_paths_lock:
            if real in _open_paths:
                raise StorageError(f"LMDB environment {path} is already open in this process")
            os.makedirs(real, exist_ok=True)
            try:
                env = lmdb.open(
                    real, map_size=map_size, max_readers=max_readers, max_dbs=0, subdir=True,
                    sync=True, metasync=True, readahead=False, writemap=False, lock=True,
                )
            except lmdb.Error as exc:
                raise StorageError(f"cannot open LMDB at {path}: {exc}") from exc
            _open_paths.add(real)
        return cls(env, real)

    async def _read(self, fn: Callable[[_LmdbTxn], T]) -> T:
        with self._resize_lock:
            try:
                with self._env.begin(write=False, buffers=False) as txn:
                    return fn(_LmdbTxn(txn))
            except DAMAGE_ERRORS as exc:
                raise self._damaged(exc) from exc
            except lmdb.Error as exc:
                raise StorageError(f"LMDB read failed: {exc}") from exc

    async def _write(self, fn: Callable[[_LmdbTxn], T]) -> T:
        if self._closed:
            raise StorageError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._write_on_writer, fn)

    def _write_on_writer(self, fn: Callable[[_LmdbTxn], T]) -> T:
        result = self._write_now(fn)
        now = time.monotonic()
        if now - self._released_at >= self.release_interval:
            self._released_at = now
            self._release()  # madvise, through ctypes, runs without the GIL
        return result

    def _write_now(self, fn: Callable[[_LmdbTxn], T]) -> T:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return fn(_LmdbTxn(txn))  # commits (and fsyncs) on leaving the block
            except lmdb.MapFullError:
                with self._copy_lock, self._map_lock, self._resize_lock:
                    size = self._env.info()["map_size"] * 2
                    self._env.set_mapsize(size)
                    self._mapped = None  # mapped again, elsewhere
                log.info("LMDB map grown to %d MiB", size >> 20)
            except DAMAGE_ERRORS as exc:
                raise self._damaged(exc) from exc
            except lmdb.Error as exc:
                # Disk full, I/O error, failed fsync: never report such a write as done.
                log.critical("LMDB write failed: %s", exc)
                raise StorageError(f"storage write failed: {exc}") from exc

    def _damaged(self, exc: Exception) -> StoreDamaged:
        reason = f"LMDB store at {self._path} is damaged: {exc}"
        if self._damage is None:
            self._damage = reason
            log.critical("%s; the proxy reports not ready. To recover, %s (docs/PERSISTENCE.md)", reason, REPAIR_HINT)
        return StoreDamaged(reason)

    def damage(self) -> str | None:
        return self._damage

    def check_edges(self) -> None:
        """The quick structural check run before the proxy reports ready: read the first and
        the last key of every key kind, which walks the root and the branch pages along each
        edge of the B-tree (a damaged root fails every request). Raises StoreDamaged."""
        with self._resize_lock:
            try:
                with self._env.begin(write=False) as txn:
                    cursor = txn.cursor()
                    for kind in b"gmqsx":  # every key kind, in key order
                        if cursor.set_range(bytes((kind,))):
                            cursor.value()
                            if cursor.prev():  # the previous kind's last key
                                cursor.value()
                    if cursor.last():
                        cursor.value()
            except DAMAGE_ERRORS as exc:
                raise self._damaged(exc) from exc

    def check_structure(self, pause: Callable[[], None] = lambda: None) -> int:
        """Read every key (every branch and leaf page of the tree), a chunk per transaction so
        reads and map growth wait at most one chunk; ``pause`` runs between chunks (requests
        first). Returns the keys read; raises StoreDamaged at the first damaged page."""
        after, count = b"", 0
        while not self._closed:
            with self._resize_lock:
                if self._closed:  # closed while this thread waited for the lock
                    break
                try:
                    with self._env.begin(write=False) as txn:
                        cursor = txn.cursor()
                        found = cursor.set_range(after) if after else cursor.first()
                        chunk, key = 0, b""
                        while found and chunk < SCAN_CHUNK:
                            key = cursor.key()
                            chunk += 1
                            found = cursor.next()
                        key = bytes(key)
                except DAMAGE_ERRORS as exc:
                    raise self._damaged(exc) from exc
            count += chunk
            if not found:
                return count
            after = key + b"\0"  # the first key past the last one read
            pause()
        return count

    def copy_to(self, path: str) -> None:
        """A consistent, compacted snapshot of the store into the empty directory ``path``
        (LMDB copies under one read transaction, while writes go on)."""
        with self._copy_lock:
            try:
                self._env.copy(path, compact=True)
            except DAMAGE_ERRORS as exc:
                raise self._damaged(exc) from exc
            except lmdb.Error as exc:
                raise StorageError(f"backup copy failed: {exc}") from exc

    def _read_rows(self, count: int) -> None:
        if count >= BULK_READ_ROWS and not self._release_queued and not self._closed:
            self._release_queued = True  # one queued drop covers every read before it runs
            self._writer.submit(self._release_after_reads)

    def _release_after_reads(self) -> None:
        self._release_queued = False
        self._released_at = time.monotonic()
        self._release()

    def sync_write(self, fn: Callable[[_LmdbTxn], T]) -> T:
        """Run a write transaction on the calling thread (start-up and tools only)."""
        return self._write_now(fn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_now)  # waits for queued fsyncs off the event loop

    def _close_now(self) -> None:
        self._writer.shutdown(wait=True)
        with self._copy_lock, self._map_lock, self._resize_lock:
            self._env.close()
        with _open_paths_lock:
            _open_paths.discard(self._path)

    def release_mapped_pages(self) -> int:
        """After a bulk read: drop the read pages from this process's mapping of the data file
        (they stay in the page cache; see proxy/storage/mapped.py). Returns the bytes covered."""
        if self._closed:
            return 0
        return self._release()

    def _release(self) -> int:
        with self._map_lock:
            if self._mapped is None:
                self._mapped = mapped.ranges(os.path.join(self._path, "data.mdb"))
            return mapped.release_ranges(self._mapped)

    def stats(self) -> dict[str, Any]:
        if self._closed:
            return {"path": self._path, "closed": True}
        with self._resize_lock:
            info, stat = self._env.info(), self._env.stat()
        return {
            "path": self._path,
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "entries": stat["entries"],
            "readers": info["num_readers"],
        }
