"""Dense vectors of one tenant: the usearch HNSW index (the only module that touches usearch)
and exact (int8-quantised) copies per group for small scopes.

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

# "i8" stores the int8 codes of ``quantize`` (a scale per vector, cosine is blind to it): half
# of f16's memory; top-10 recall on 100k LoCoMo MiniLM-like vectors 0.984 either way. usearch's own
# float-to-i8 cast (x * 127, no scale) would lose more: 0.95.
DTYPES = ("i8", "f16", "f32")
EXACT_MAX = 8192  # scopes up to this many vectors are scored exactly from the copies


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

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        """What usearch is given: float32, or for "i8" the int8 codes of ``quantize``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.dtype != "i8":
            return vectors
        peak = np.abs(vectors).max(axis=-1, keepdims=True)
        return np.round(vectors / np.where(peak > 0, peak / 127, 1.0)).astype(np.int8)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert (writer thread only). One vector per lock hold keeps searches responsive."""
        vectors = self._encode(vectors)
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
            found = self._index.search(self._encode(vector), count, threads=1)
            keys, distances = np.array(found.keys, dtype=np.uint64), np.array(found.distances, dtype=np.float32)
        return keys, 1.0 - distances

    def keys(self) -> np.ndarray:
        with self.lock:
            return np.array(self._index.keys, dtype=np.uint64)

    def memory_usage(self) -> int:
        with self.lock:
            return int(self._index.memory_usage)

    def save(self, path: Path) -> str:
        """Write the index atomically; returns the file's digest for the manifest. usearch
        writes the file itself: no copy of the whole index passes through Python."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
        with self.lock:
            self._index.save(str(temporary))
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        digest = _file_digest(temporary)
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
            found = _file_digest(path)
        except OSError as exc:
            raise IndexFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        if found != digest:
            raise IndexFileError(f"{path} does not match its manifest (corrupt or stale)")
        index = cls(dim, dtype)
        wanted = index._index.dtype  # usearch takes the file's dtype silently
        try:
            index._index.load(str(path))  # only this process writes it, by atomic rename
        except Exception as exc:  # usearch raises plain RuntimeError/ValueError
            raise IndexFileError(f"usearch could not load {path}: {exc}") from None
        if index._index.ndim != dim:
            raise IndexFileError(f"{path} holds {index._index.ndim}-d vectors, expected {dim}")
        if index._index.dtype != wanted:
            raise IndexFileError(f"{path} holds {index._index.dtype} vectors, expected {dtype}")
        return index


def _file_digest(path: Path) -> str:
    """BLAKE2b of a file, read in 1 MiB pieces (an index file is ~0.9 KB per vector)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as file:
        while piece := file.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


class _Group:
    __slots__ = ("vectors", "scales", "slots", "n", "dead")

    def __init__(self, dim: int, size: int = 16) -> None:
        self.vectors = np.zeros((size, dim), dtype=np.int8)
        self.scales = np.zeros(size, dtype=np.float32)
        self.slots = np.full(size, -1, dtype=np.int64)
        self.n = 0
        self.dead = 0

    def resize(self, size: int, rows: np.ndarray | slice) -> _Group:
        """A group of ``size`` rows holding this one's ``rows``."""
        fresh = _Group(self.vectors.shape[1], size)
        kept = self.slots[rows]
        fresh.vectors[: len(kept)] = self.vectors[rows]
        fresh.scales[: len(kept)] = self.scales[rows]
        fresh.slots[: len(kept)] = kept
        fresh.n = len(kept)
        return fresh

    def cosines(self, query: np.ndarray) -> np.ndarray:
        return (self.vectors[: self.n].astype(np.float32) @ query) * self.scales[: self.n]


def quantize(vector: np.ndarray) -> tuple[np.ndarray, float]:
    """int8 codes and the scale that restores them: a quarter of float32's memory, and cosines
    within ~0.002 of exact (top-10 of 6.6k LoCoMo sentences: 99.4 % the same as float32)."""
    peak = float(np.abs(vector).max())
    scale = peak / 127 if peak > 0 else 1.0
    return np.round(vector / scale).astype(np.int8), scale


class Mirror:
    """Exact copies of the vectors, grouped (by user), for exact search of small scopes.

    Stored as int8 with a scale per vector (~0.4 KB a memory instead of 1.5 KB: at 100k memories
    that is 40 MB instead of 150). Mutated and read on the event loop thread only.
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
            found = self._groups[group] = found.resize(found.n * 2, slice(0, found.n))
        found.vectors[found.n], found.scales[found.n] = quantize(vector)
        found.slots[found.n] = slot
        self._where[slot] = (group, found.n)
        found.n += 1

    def remove(self, slot: int) -> None:
        where = self._where.pop(slot, None)
        if where is None:
            return
        group = self._groups[where[0]]
        group.slots[where[1]] = -1
        group.vectors[where[1]] = 0
        group.scales[where[1]] = 0.0
        group.dead += 1
        if group.dead > 64 and group.dead * 2 > group.n:
            self._compact(where[0], group)

    def _compact(self, code: int, group: _Group) -> None:
        live = np.flatnonzero(group.slots[: group.n] >= 0)
        fresh = self._groups[code] = group.resize(max(16, 1 << int(len(live)).bit_length()), live)
        for row, slot in enumerate(fresh.slots[: fresh.n]):
            self._where[int(slot)] = (code, row)

    def vector(self, slot: int) -> np.ndarray | None:
        """The stored vector, restored to float32 (unit length within the quantisation error)."""
        where = self._where.get(slot)
        if where is None:
            return None
        group = self._groups[where[0]]
        return group.vectors[where[1]].astype(np.float32) * group.scales[where[1]]

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
            sims = group.cosines(query)
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
        return sum(g.vectors.nbytes + g.scales.nbytes + g.slots.nbytes for g in self._groups.values())
