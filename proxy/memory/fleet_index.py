"""Fleet mode: one replica's saved index, in its own ``index_dir``, so a restart reuses the HNSW
graph instead of rebuilding it from PostgreSQL's vectors (docs/BENCHMARKS.md, Fleet mode).

In fleet mode the usearch labels are the replica's own numbering of the memories it holds
(proxy/memory/fleet_sync.py), so the index file is useless without the key map that goes with
it. Next to ``<tenant>.fleet.usearch`` a local manifest, ``<tenant>.fleet.json``, holds:

* the file's digest, the embedding model, dimensions and dtype the vectors were made with;
* the replica's key map (memory id -> label) and the next label it would hand out;
* the tenant's change-log number (cursor) the replica had applied when it took the key map:
  every memory named by a later change is given a fresh label at the next start, so a vector it
  had when saved is never trusted for it.

Both are written atomically (temporary file, fsync, rename, fsync of the directory), the index
first: a crash between the two leaves a manifest whose digest does not match the file, which
is rebuilt. The manifest carries a digest of its own body; anything unreadable or inconsistent
raises ``SavedIndexError`` (the caller rebuilds). An ``index_dir`` is claimed with a lock for
the life of the process: two replicas configured with one ``data_dir`` on one host do not
overwrite each other's files (the second rebuilds at every start and saves nothing).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = 1
_LOCK = "fleet.lock"


class SavedIndexError(Exception):
    """The saved manifest is missing, damaged or does not describe a usable index."""


@dataclass(frozen=True)
class SavedIndex:
    digest: str  # of the usearch file
    model: str
    dim: int
    dtype: str
    cursor: int  # the tenant's change-log number the key map corresponds to
    next_key: int  # above every label in the file
    keys: dict[str, int]  # memory id -> label


class ReplicaFiles:
    """The saved indexes of one replica: paths, the lock on the directory, read and write."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self._lock: IO[str] | None = None

    def claim(self) -> bool:
        """Take the directory for this process (released when it exits, kill -9 included);
        False when another process holds it."""
        self.index_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.index_dir / _LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock = handle
        return True

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()

    def index_path(self, tenant: str) -> Path:
        return self.index_dir / f"{tenant}.fleet.usearch"

    def manifest_path(self, tenant: str) -> Path:
        return self.index_dir / f"{tenant}.fleet.json"

    def read(self, tenant: str) -> SavedIndex | None:
        """The tenant's saved manifest, None when there is none; SavedIndexError when it is
        damaged or inconsistent."""
        path = self.manifest_path(tenant)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SavedIndexError(f"cannot read {path}: {exc.strerror or exc}") from None
        return _decode(raw, path)

    def write(self, tenant: str, saved: SavedIndex) -> None:
        """Write the manifest atomically (on a file thread: the key map makes it large)."""
        ids = list(saved.keys)
        body = {"format": FORMAT, "digest": saved.digest, "model": saved.model, "dim": saved.dim, "dtype": saved.dtype,
                "cursor": saved.cursor, "next_key": saved.next_key, "ids": ids, "keys": [saved.keys[i] for i in ids]}
        encoded = json.dumps(body, separators=(",", ":")).encode()
        document = json.dumps({"blake2b": _digest(encoded)}).encode() + b"\n" + encoded
        write_atomically(self.manifest_path(tenant), document)


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename over ``path``, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def _decode(raw: bytes, path: Path) -> SavedIndex:
    header, _, encoded = raw.partition(b"\n")
    try:
        if json.loads(header)["blake2b"] != _digest(encoded):
            raise SavedIndexError(f"{path} is damaged (its digest does not match)")
        body: dict[str, Any] = json.loads(encoded)
    except (ValueError, KeyError, TypeError):
        raise SavedIndexError(f"{path} is damaged (not a manifest)") from None
    if body.get("format") != FORMAT:
        raise SavedIndexError(f"{path} has format {body.get('format')!r}, expected {FORMAT}")
    try:
        ids, keys = body["ids"], body["keys"]
        saved = SavedIndex(str(body["digest"]), str(body["model"]), int(body["dim"]), str(body["dtype"]), int(body["cursor"]),
                           int(body["next_key"]), dict(zip(ids, keys)))
        valid = (isinstance(ids, list) and isinstance(keys, list) and len(ids) == len(keys) == len(saved.keys)
                 and all(isinstance(i, str) for i in ids)
                 and all(type(k) is int and 0 <= k < saved.next_key for k in keys) and len(set(keys)) == len(keys))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise SavedIndexError(f"{path} holds an inconsistent key map")
    return saved
