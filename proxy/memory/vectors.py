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
from typing import Callable, Iterable

import numpy as np

# "i8" stores the int8 codes of ``quantize`` (a scale per vector, cosine is blind to it): half
# of f16's memory at the same recall. usearch's own float-to-i8 cast (x * 127, no scale) would
# lose recall (docs/MEMORY.md).
DTYPES = ("i8", "f16", "f32")
EXACT_MAX = 8192  # scopes up to this many vectors are scored exactly from the copies


class IndexFileError(Exception):
    """The saved index file is missing, corrupt or does not fit the tenant's settings."""


def _usearch_index() -> type:
    """usearch's Index class, with ONNX Runtime (the local embedder's engine) loaded first.

    Loaded after usearch, onnxruntime breaks: 1.22 builds corrupt graphs ("Type parameter (T)
    of Optype (Mul) bound to different types"), 1.23 and later crash the process in libstdc++
    at import. The proxy loads its index and its embedder on two threads in no set order, so
    the one module that imports usearch imports onnxruntime before it (tests/test_embedder_int8.py).
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # not installed: nothing to protect
        pass
    from usearch.index import Index

    return Index


class VectorIndex:
    """A cosine HNSW index over unit vectors, keyed by uint64."""

    def __init__(self, dim: int, dtype: str = "f16", *, connectivity: int = 16, expansion_add: int = 128, expansion_search: int = 96) -> None:
        Index = _usearch_index()

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
        return quantize(vectors)[0] if self.dtype == "i8" else vectors

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

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A bool mask: which of ``keys`` the index holds."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return np.zeros(0, dtype=bool)
        with self.lock:
            return np.asarray(self._index.contains(keys), dtype=bool).reshape(len(keys))

    def keys(self) -> np.ndarray:
        with self.lock:
            return np.array(self._index.keys, dtype=np.uint64)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` as unit float32 rows (zeros for a key not held)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        if not len(keys):
            return out
        with self.lock:
            found = self._index.get(keys, dtype=np.float32)
        for row, vector in enumerate(found):
            if vector is not None:
                out[row] = vector
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)

    def save(self, path: Path) -> str:
        """Write the index atomically (writer thread only); returns the file's digest for the
        manifest. usearch writes the file itself: no copy of the whole index passes through
        Python."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
        # Without the lock: every change to the index runs on the writer thread, as this does,
        # so nothing changes while it writes, and searches only read. usearch still holds the
        # GIL for the whole write (docs/MEMORY.md), so the service saves in quiet
        # moments (MemoryService.save_when_quiet).
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


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of each row (of one vector or a matrix) and the scales that restore them: a
    quarter of float32's memory, and cosines within ~0.002 of exact (top-10 of 6.6k LoCoMo
    sentences: 99.4 % the same as float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    peak = np.abs(vectors).max(axis=-1, keepdims=True)
    scale = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
    return np.round(vectors / scale).astype(np.int8), scale[..., 0]


_ABSENT, _RELEASED = -1, -2  # Mirror._row values besides a row number


class Mirror:
    """Exact copies of the vectors, grouped (by user), for exact search of small scopes.

    Stored as int8 with a scale per vector (~0.4 KB a memory instead of 1.5 KB). A group too
    large ever to be searched exactly can ``release`` the copies the HNSW index also holds (40 MB
    at 100k memories): those vectors are read back from the index through ``lookup`` for the
    few memories that need a cosine outside of an HNSW search. Mutated and read on the event
    loop thread only.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._groups: dict[int, _Group] = {}
        self._group = np.empty(0, dtype=np.int32)  # slot -> its group
        self._row = np.empty(0, dtype=np.int32)  # slot -> its row in the group, _ABSENT or _RELEASED
        self._released: dict[int, int] = {}  # group -> live vectors released to the index
        self.lookup: Callable[[np.ndarray], np.ndarray] | None = None  # slots -> released vectors

    def __contains__(self, slot: int) -> bool:
        return slot < len(self._row) and self._row[slot] != _ABSENT

    def add(self, slot: int, group: int, vector: np.ndarray) -> None:
        found = self._groups.get(group)
        if found is None:
            found = self._groups[group] = _Group(self.dim)
        if found.n == len(found.slots):
            found = self._groups[group] = found.resize(found.n * 2, slice(0, found.n))
        found.vectors[found.n], found.scales[found.n] = quantize(vector)
        found.slots[found.n] = slot
        if slot >= len(self._row):
            size = max(1024, 2 * len(self._row), slot + 1)
            self._group = np.resize(self._group, size)
            self._row = np.concatenate([self._row, np.full(size - len(self._row), _ABSENT, dtype=np.int32)])
        self._group[slot], self._row[slot] = group, found.n
        found.n += 1

    def remove(self, slot: int) -> None:
        if slot not in self:
            return
        code, row = int(self._group[slot]), int(self._row[slot])
        self._row[slot] = _ABSENT
        if row == _RELEASED:
            self._released[code] -= 1
            return
        group = self._groups[code]
        group.slots[row] = -1
        group.vectors[row] = 0
        group.scales[row] = 0.0
        group.dead += 1
        if group.dead > 64 and group.dead * 2 > group.n:
            self._compact(code, group, np.flatnonzero(group.slots[: group.n] >= 0))

    def _compact(self, code: int, group: _Group, rows: np.ndarray) -> None:
        """Keep only ``rows`` of the group."""
        fresh = self._groups[code] = group.resize(max(16, 1 << int(len(rows)).bit_length()), rows)
        self._row[fresh.slots[: fresh.n]] = np.arange(fresh.n, dtype=np.int32)

    def release(self, code: int, indexed: Callable[[np.ndarray], np.ndarray]) -> int:
        """Drop the group's copies of the vectors whose slots ``indexed(slots) -> bool mask``
        says the index holds; returns how many were dropped."""
        group = self._groups.get(code)
        if group is None:
            return 0
        rows = np.flatnonzero(group.slots[: group.n] >= 0)
        held = indexed(group.slots[rows]) if len(rows) else np.zeros(0, dtype=bool)
        if not held.any():
            return 0
        self._row[group.slots[rows[held]]] = _RELEASED
        self._released[code] = self._released.get(code, 0) + int(held.sum())
        self._compact(code, group, rows[~held])
        return int(held.sum())

    def released(self, groups: Iterable[int] | None) -> bool:
        """Whether any of ``groups`` (all when None) has vectors only in the index."""
        codes = self._released.keys() if groups is None else groups
        return any(self._released.get(code, 0) > 0 for code in codes)

    def held(self, code: int) -> int:
        """Rows of copies the group holds (live or not yet compacted away)."""
        group = self._groups.get(code)
        return 0 if group is None else group.n

    def vector(self, slot: int) -> np.ndarray | None:
        """The stored vector, restored to float32 (unit length within the quantisation error)."""
        if slot not in self:
            return None
        row = int(self._row[slot])
        if row == _RELEASED:
            return self.lookup(np.array([slot], dtype=np.int64))[0] if self.lookup is not None else None
        group = self._groups[int(self._group[slot])]
        return group.vectors[row].astype(np.float32) * group.scales[row]

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        """The vectors of ``slots`` as float32 rows (zeros for a slot without one)."""
        slots = np.asarray(slots, dtype=np.int64)
        out = np.zeros((len(slots), self.dim), dtype=np.float32)
        present = slots < len(self._row)
        rows = np.full(len(slots), _ABSENT, dtype=np.int32)
        rows[present] = self._row[slots[present]]
        released = np.flatnonzero(rows == _RELEASED)
        if len(released) and self.lookup is not None:
            out[released] = self.lookup(slots[released])
        codes = self._group[slots[rows >= 0]]
        for code in np.unique(codes).tolist():
            where = np.flatnonzero(rows >= 0)[codes == code]
            group = self._groups[code]
            out[where] = group.vectors[rows[where]].astype(np.float32) * group.scales[rows[where], None]
        return out

    def size(self, groups: Iterable[int]) -> int:
        return sum(self._groups[g].n - self._groups[g].dead + self._released.get(g, 0) for g in groups if g in self._groups)

    def search(self, query: np.ndarray, groups: Iterable[int] | None, limit: int, admit=None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``limit`` slots of ``groups`` (all when None) by cosine, best first; only
        over the copies held (see ``released``)."""
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
        return self.vectors(slots) @ np.asarray(query, dtype=np.float32)

    def nbytes(self) -> int:
        held = sum(g.vectors.nbytes + g.scales.nbytes + g.slots.nbytes for g in self._groups.values())
        return held + self._group.nbytes + self._row.nbytes
