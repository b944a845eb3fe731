"""all-MiniLM-L6-v2's word-embedding table, read row by row from the weights file.

The table is 30522 × 384 float32 (47 MB) and a text needs only its tokens' rows. It used to be
memory-mapped, but the page cache holds a file read or written in bulk in folios of up to 2 MB,
and a read through a mapping maps the whole folio: a few dozen distinct tokens put 12 MB of the
file in the proxy's RSS (benchmark, full mode), a varied workload would put all 47 MB. Rows are
instead read with ``pread`` into a bounded cache of the rows of the tokens seen, ~1.5 KB each.
A cached row is gathered by numpy; only a miss costs a system call (~2 µs).
"""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["WordTable"]

# Rows kept: 6 MB at 384 dimensions. Word-piece frequencies fall off fast; the tokens of a
# workload's usual vocabulary fit, and a rare one costs a pread when it comes back.
DEFAULT_CAPACITY = 4096


class WordTable:
    """Rows of a C-ordered little-endian float32 ``(vocab, dim)`` tensor at ``offset`` in a file.
    Safe to share between threads (the query and indexing embedders do)."""

    def __init__(self, path: str | os.PathLike[str], offset: int, shape: tuple[int, int], *,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.vocab, self.dim = shape
        self._offset, self._row_bytes = offset, 4 * self.dim
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - open as long as the table
        self.capacity = max(1, min(capacity, self.vocab))
        self._slot_of = np.full(self.vocab, -1, dtype=np.int32)  # token -> slot, -1: not cached
        self._token_in = np.full(self.capacity, -1, dtype=np.int32)  # slot -> token
        self._rows = np.empty((min(256, self.capacity), self.dim), dtype="<f4")  # grows to capacity
        self._referenced = np.zeros(self.capacity, dtype=bool)  # CLOCK's second-chance bits
        self._filled = 0
        self._hand = 0
        self._lock = threading.Lock()
        self.misses = 0

    def __len__(self) -> int:
        return self._filled

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """A new float32 array of shape ``ids.shape + (dim,)`` with each id's row."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.empty(ids.shape + (self.dim,), dtype=np.float32)
        with self._lock:
            slots = self._slot_of.take(ids)  # IndexError past the vocabulary
            if slots.min() < 0:
                if int(ids.min()) < 0:
                    raise IndexError("negative token id")
                distinct = np.unique(ids)
                if len(distinct) > self.capacity:
                    return self._read_uncached(ids)  # one text with more distinct tokens than fit
                self._load(distinct)
                slots = self._slot_of.take(ids)
            self._referenced[slots] = True
            return self._rows.take(slots, axis=0)

    def _load(self, distinct: np.ndarray) -> None:
        """Read the rows of ``distinct`` (sorted unique ids) that are not cached, evicting none
        of the others: they fit (``len(distinct) <= capacity``), so a free slot is always found."""
        slots = self._slot_of[distinct]
        pinned = np.zeros(self.capacity, dtype=bool)
        pinned[slots[slots >= 0]] = True
        for token in distinct[slots < 0].tolist():
            slot = self._free_slot(pinned)
            if (old := self._token_in[slot]) >= 0:
                self._slot_of[old] = -1
            self._rows[slot] = self._read(token)
            self._token_in[slot], self._slot_of[token] = token, slot
            self._referenced[slot], pinned[slot] = True, True
            self.misses += 1

    def _free_slot(self, pinned: np.ndarray) -> int:
        if self._filled < self.capacity:
            if self._filled == len(self._rows):
                grown = np.empty((min(2 * len(self._rows), self.capacity), self.dim), dtype="<f4")
                grown[: self._filled] = self._rows[: self._filled]
                self._rows = grown
            self._filled += 1
            return self._filled - 1
        while True:  # CLOCK: evict the first slot not referenced since the hand last passed
            slot = self._hand
            self._hand = (self._hand + 1) % self.capacity
            if pinned[slot]:
                continue
            if self._referenced[slot]:
                self._referenced[slot] = False
                continue
            return slot

    def _read(self, token: int) -> np.ndarray:
        raw = os.pread(self._file.fileno(), self._row_bytes, self._offset + token * self._row_bytes)
        if len(raw) != self._row_bytes:
            raise OSError(f"short read of the word table for token {token}")
        return np.frombuffer(raw, dtype="<f4")

    def _read_uncached(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(ids.shape + (self.dim,), dtype=np.float32)
        flat = out.reshape(-1, self.dim)
        for i, token in enumerate(ids.reshape(-1).tolist()):
            slot = self._slot_of[token]
            flat[i] = self._rows[slot] if slot >= 0 else self._read(token)
        return out
