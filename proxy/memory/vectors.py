"""Dense vectors of one tenant: the usearch HNSW index (the only module that touches usearch)
and exact float32 copies per group for small scopes.

usearch is not safe for concurrent writers nor for a search racing a resize, so every call into
the index holds ``VectorIndex.lock``; writes come from one writer thread only, one vector per
lock hold so a search never waits for more than one insertion. Keys are uint64 and never
reused (usearch mishandles a key removed and added again), so a removed key stays retired.

The index file is written to a temporary file, fsynced and renamed over the old one; its
BLAKE2b digest is kept in LMDB (the manifest), and a file whose digest does not match is never
handed to usearch: a truncated or corrupt file is rebuilt from LMDB instead of crashing.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

DTYPES = ("f16", "f32")
EXACT_MAX = 8192  # scopes up to this many vectors are scored exactly from the float32 copies


class IndexFileError(Exception):
    """The saved index file is missing, corrupt or does not fit the tenant's settings."""


class VectorIndex:
    """A cosine HNSW index over unit vectors, keyed by uint64."""

    def __init__(self, dim: int, dtype: str = "f16", *, connectivity: int = 16, expansion_add: int = 128, expansion_search: int = 96) -> None:
        from usearch.index import Index

        if dtype not in DTYPES:
            raise ValueError(f"index dtype must be one of {DTYPES}")
        self.dim, self.dtype = dim, dtype
        self._index = Index(ndim=dim, metric="cos", dtype=dtype, connectivity=connectivity,
                            expansion_add=expansion_add, expansion_search=expansion_search)
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert (writer thread only). One vector per lock hold keeps searches responsive."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for key, vector in zip(np.asarray(keys, dtype=np.uint64), vectors):
            with self.lock:
                if not self._index.contains(int(key)):
                    self._index.add(int(key), vector, threads=1)

    def remove(self, keys: Iterable[int]) -> None:
        keys = np.fromiter(keys, dtype=np.uint64)
        if len(keys):
            with self.lock:
                self._index.remove(keys)

    def search(self, vector: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` nearest keys and their cosine similarities, best first."""
        with self.lock:
            if len(self._index) == 0:
                return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.float32)
            found = self._index.search(np.asarray(vector, dtype=np.float32), count, threads=1)
            keys, distances = np.array(found.keys, dtype=np.uint64), np.array(found.distances, dtype=np.float32)
        return keys, 1.0 - distances

    def keys(self) -> np.ndarray:
        with self.lock:
            return np.array(self._index.keys, dtype=np.uint64)

    def memory_usage(self) -> int:
        with self.lock:
            return int(self._index.memory_usage)

    def save(self, path: Path) -> str:
        """Write the index atomically; returns the file's digest for the manifest."""
        with self.lock:
            data = self._index.save()
        data = bytes(data)
        digest = hashlib.blake2b(data, digest_size=20).hexdigest()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return digest

    @classmethod
    def load(cls, path: Path, digest: str, dim: int, dtype: str) -> VectorIndex:
        """Load a saved index whose bytes hash to ``digest``; IndexFileError otherwise."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IndexFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        if hashlib.blake2b(data, digest_size=20).hexdigest() != digest:
            raise IndexFileError(f"{path} does not match its manifest (corrupt or stale)")
        index = cls(dim, dtype)
        try:
            index._index.load(data)
        except Exception as exc:  # usearch raises plain RuntimeError/ValueError
            raise IndexFileError(f"usearch could not load {path}: {exc}") from None
        if index._index.ndim != dim:
            raise IndexFileError(f"{path} holds {index._index.ndim}-d vectors, expected {dim}")
        return index


class _Group:
    __slots__ = ("vectors", "slots", "n", "dead")

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((16, dim), dtype=np.float32)
        self.slots = np.full(16, -1, dtype=np.int64)
        self.n = 0
        self.dead = 0


class Mirror:
    """Exact float32 copies of the vectors, grouped (by user), for exact search of small scopes.

    Mutated and read on the event loop thread only.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._groups: dict[int, _Group] = {}
        self._where: dict[int, tuple[int, int]] = {}  # slot -> (group, row)

    def __contains__(self, slot: int) -> bool:
        return slot in self._where

    def add(self, slot: int, group: int, vector: np.ndarray) -> None:
        found = self._groups.get(group)
        if found is None:
            found = self._groups[group] = _Group(self.dim)
        if found.n == len(found.slots):
            size = found.n * 2
            vectors = np.zeros((size, self.dim), dtype=np.float32)
            vectors[: found.n] = found.vectors[: found.n]
            slots = np.full(size, -1, dtype=np.int64)
            slots[: found.n] = found.slots[: found.n]
            found.vectors, found.slots = vectors, slots
        found.vectors[found.n] = vector
        found.slots[found.n] = slot
        self._where[slot] = (group, found.n)
        found.n += 1

    def remove(self, slot: int) -> None:
        where = self._where.pop(slot, None)
        if where is None:
            return
        group = self._groups[where[0]]
        group.slots[where[1]] = -1
        group.vectors[where[1]] = 0.0
        group.dead += 1
        if group.dead > 64 and group.dead * 2 > group.n:
            self._compact(where[0], group)

    def _compact(self, code: int, group: _Group) -> None:
        live = np.flatnonzero(group.slots[: group.n] >= 0)
        fresh = _Group(self.dim)
        size = max(16, 1 << int(len(live)).bit_length())
        fresh.vectors = np.zeros((size, self.dim), dtype=np.float32)
        fresh.slots = np.full(size, -1, dtype=np.int64)
        fresh.vectors[: len(live)] = group.vectors[live]
        fresh.slots[: len(live)] = group.slots[live]
        fresh.n = len(live)
        self._groups[code] = fresh
        for row, slot in enumerate(fresh.slots[: fresh.n]):
            self._where[int(slot)] = (code, row)

    def vector(self, slot: int) -> np.ndarray | None:
        where = self._where.get(slot)
        if where is None:
            return None
        return self._groups[where[0]].vectors[where[1]]

    def size(self, groups: Iterable[int]) -> int:
        return sum(self._groups[g].n - self._groups[g].dead for g in groups if g in self._groups)

    def search(self, query: np.ndarray, groups: Iterable[int] | None, limit: int, admit=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``limit`` slots of ``groups`` (all when None) by cosine, best first."""
        slots_parts, sims_parts = [], []
        codes = self._groups.keys() if groups is None else groups
        for code in codes:
            group = self._groups.get(code)
            if group is None or group.n == 0:
                continue
            sims = group.vectors[: group.n] @ query
            slots = group.slots[: group.n]
            keep = slots >= 0
            slots_parts.append(slots[keep])
            sims_parts.append(sims[keep])
        if not slots_parts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        slots = np.concatenate(slots_parts)
        sims = np.concatenate(sims_parts)
        if admit is not None and len(slots):
            keep = admit(slots)
            slots, sims = slots[keep], sims[keep]
        if len(slots) > limit:
            part = np.argpartition(-sims, limit - 1)[:limit]
            slots, sims = slots[part], sims[part]
        order = np.argsort(-sims, kind="stable")
        return slots[order], sims[order]

    def score(self, query: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Cosine of ``query`` with each of ``slots`` (0 for a slot without a vector)."""
        out = np.zeros(len(slots), dtype=np.float32)
        found = [(i, self.vector(int(slot))) for i, slot in enumerate(slots)]
        found = [(i, v) for i, v in found if v is not None]
        if found:
            out[[i for i, _ in found]] = np.stack([v for _, v in found]) @ query
        return out

    def nbytes(self) -> int:
        return sum(g.vectors.nbytes + g.slots.nbytes for g in self._groups.values())
