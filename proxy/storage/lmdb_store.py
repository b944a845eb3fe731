"""The LMDB backend: durable, transactional, one environment per process.

Writes run on one dedicated thread (LMDB has a single writer anyway), so an fsync never
blocks the event loop; reads run inline on the caller's thread, they take microseconds.

Reads go through a shared read-only mapping of the data file: the pages they touch count in
the process's RSS as file pages (RssFile, page cache the kernel reclaims on its own), never in
its own memory (RssAnon), which is what the proxy's memory goal bounds (docs/PERSISTENCE.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from proxy.storage.base import REPAIR_HINT, StorageError, StoreDamaged
from proxy.storage.kv import KVStore

log = logging.getLogger("agent_state_proxy.storage")
T = TypeVar("T")

# LMDB errors that mean the file's structure is damaged (a page of the wrong type, a page number
# beyond the file, not an LMDB file, a fatal environment error), as opposed to a failed write.
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError)
# Keys read per transaction by the structural scan: each chunk holds the read lock (which every
# read takes), so a request waits at most one chunk behind the background scan.
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



class LmdbStore(KVStore):
    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self._path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")
        # Growing the map (set_mapsize) is only safe while no transaction of this process is
        # open, so reads share this lock with the resize (uncontended, a small fraction of a read).
        self._resize_lock = threading.Lock()
        # Held by a backup copy (its own read transaction, for seconds): the map may not grow
        # meanwhile, but reads and writes go on.
        self._copy_lock = threading.Lock()
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
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._write_now, fn)

    def _write_now(self, fn: Callable[[_LmdbTxn], T]) -> T:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return fn(_LmdbTxn(txn))  # commits (and fsyncs) on leaving the block
            except lmdb.MapFullError:
                with self._copy_lock, self._resize_lock:
                    size = self._env.info()["map_size"] * 2
                    self._env.set_mapsize(size)
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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_now)  # waits for queued fsyncs off the event loop

    def _close_now(self) -> None:
        self._writer.shutdown(wait=True)
        with self._copy_lock, self._resize_lock:
            self._env.close()
        with _open_paths_lock:
            _open_paths.discard(self._path)

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
