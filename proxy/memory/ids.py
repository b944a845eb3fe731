"""A tenant's memory ids by slot, and slots by id, in numpy arrays.

A list of id strings and a dict from id to slot cost ~145 bytes a memory (the string, the
dict entry, the slot's int object): 14 MB for the benchmark's 100k-memory tenant. Here an id
of up to 24 ASCII characters (every id the proxy makes: ``mem_`` and 20 hex digits) is 24
bytes in one array, and the id -> slot lookup is an open-addressing table of (hash, slot)
pairs: ~60 bytes a memory in all. Other ids stay Python strings in a small dict.
"""

from __future__ import annotations

import numpy as np

_WIDTH = 24
_EMPTY, _REMOVED = -1, -2  # table entries that hold no slot
_MAX_LOAD = 0.6  # of the table's entries in use (removed ones included) before it grows


class MemoryIds:
    def __init__(self) -> None:
        self._packed = np.zeros(0, dtype=f"S{_WIDTH}")  # slot -> id (b"": removed or in _other)
        self._other: dict[int, str] = {}  # slot -> an id the packed column cannot hold
        self._count = 0  # slots handed out
        self._hashes = np.zeros(8, dtype=np.int64)
        self._slots = np.full(8, _EMPTY, dtype=np.int32)
        self._used = 0  # table entries that are not _EMPTY
        self.live = 0

    def __len__(self) -> int:
        """Slots handed out, removed ones included (the next slot's number)."""
        return self._count

    def __getitem__(self, slot: int) -> str | None:
        """The id at ``slot``; None once removed."""
        if not 0 <= slot < self._count:
            raise IndexError(slot)
        packed = self._packed[slot]
        if packed:
            return packed.decode("ascii")
        return self._other.get(slot)

    def column(self, slots: np.ndarray | list[int]) -> tuple[np.ndarray, dict[int, str]]:
        """The ids at ``slots``, cheaply (a copy of their packed bytes, and the ids the packed
        column cannot hold by position): a saved key map takes every id on the event loop and
        decodes them elsewhere (``decoded``)."""
        slots = np.asarray(slots, dtype=np.int64)
        packed = self._packed[slots]
        others = {int(i): self._other[int(slots[i])] for i in np.flatnonzero(packed == b"").tolist() if int(slots[i]) in self._other}
        return packed, others

    @staticmethod
    def decoded(column: tuple[np.ndarray, dict[int, str]]) -> list[str | None]:
        """The ids of a ``column`` (None for a removed slot)."""
        packed, others = column
        found: list[str | None] = packed.astype(f"U{_WIDTH}").tolist()
        for i in np.flatnonzero(packed == b"").tolist():
            found[i] = others.get(i)
        return found

    def __contains__(self, memory_id: object) -> bool:
        return isinstance(memory_id, str) and self._find(memory_id)[1] is not None

    def slot(self, memory_id: str) -> int | None:
        return self._find(memory_id)[1]

    def append(self, memory_id: str) -> int:
        """Give ``memory_id`` (not present: see ``slot``) the next slot."""
        slot = self._count
        if slot == len(self._packed):
            self._packed = np.concatenate([self._packed, np.zeros(max(1024, slot), dtype=self._packed.dtype)])
        if _packable(memory_id):
            self._packed[slot] = memory_id.encode("ascii")
        else:
            self._other[slot] = memory_id
        self._count += 1
        if (self._used + 1) > _MAX_LOAD * len(self._slots):
            self._rehash(2 * len(self._slots) if 2 * self.live >= _MAX_LOAD * len(self._slots) else len(self._slots))
        self._insert(hash(memory_id), slot)
        self.live += 1
        return slot

    def remove(self, memory_id: str) -> int | None:
        """Forget ``memory_id``; its slot (never handed out again), or None if absent."""
        entry, slot = self._find(memory_id)
        if slot is None:
            return None
        self._slots[entry] = _REMOVED
        self._packed[slot] = b""
        self._other.pop(slot, None)
        self.live -= 1
        return slot

    # -- the table ----------------------------------------------------------------------------

    def _find(self, memory_id: str) -> tuple[int, int | None]:
        """(table entry, slot) of ``memory_id``; (-1, None) when absent."""
        h = hash(memory_id)
        mask = len(self._slots) - 1
        entry = h & mask
        while True:
            slot = int(self._slots[entry])
            if slot == _EMPTY:
                return -1, None
            if slot >= 0 and int(self._hashes[entry]) == h and self[slot] == memory_id:
                return entry, slot
            entry = (entry + 1) & mask

    def _insert(self, h: int, slot: int) -> None:
        mask = len(self._slots) - 1
        entry = h & mask
        while self._slots[entry] >= 0:  # a removed entry is reused
            entry = (entry + 1) & mask
        if self._slots[entry] == _EMPTY:
            self._used += 1
        self._hashes[entry], self._slots[entry] = h, slot

    def _rehash(self, size: int) -> None:
        """A table of ``size`` entries (a power of two) with only the live ids."""
        live = self._slots[self._slots >= 0]
        hashes = self._hashes[self._slots >= 0]
        self._hashes = np.zeros(size, dtype=np.int64)
        self._slots = np.full(size, _EMPTY, dtype=np.int32)
        self._used = 0
        for h, slot in zip(hashes.tolist(), live.tolist()):
            self._insert(h, slot)


def _packable(memory_id: str) -> bool:
    # Non-empty (b"" marks a removed slot), ASCII, no trailing NUL (numpy strips those).
    return 0 < len(memory_id) <= _WIDTH and memory_id.isascii() and not memory_id.endswith("\0")
