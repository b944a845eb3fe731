"""A set of memory slots as a sorted int32 array.

A tenant groups its slots by session, by user (memories without a session) and by kind. A
Python set of ints costs ~55 bytes a slot: 5.5 MB for the benchmark user's 100k memories,
for a group that is only ever counted, iterated or merged. Slots are handed out in increasing
order (``TenantMemory.insert``), so adding one is an append; removing one (rare: deletion,
rollback) shifts the tail.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


class SlotSet:
    __slots__ = ("_slots", "_n")

    def __init__(self, slots: Iterable[int] = ()) -> None:
        self._slots = np.zeros(4, dtype=np.int32)
        self._n = 0
        for slot in slots:
            self.add(slot)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots[: self._n].tolist())

    def __contains__(self, slot: object) -> bool:
        if not isinstance(slot, (int, np.integer)):
            return False
        i = int(np.searchsorted(self._slots[: self._n], slot))
        return i < self._n and self._slots[i] == slot

    def __repr__(self) -> str:
        return f"SlotSet({self._slots[: self._n].tolist()})"

    def array(self) -> np.ndarray:
        """The slots, ascending (a copy)."""
        return self._slots[: self._n].copy()

    def add(self, slot: int) -> None:
        n = self._n
        if n and self._slots[n - 1] >= slot:  # not the newest: insert in order, unless present
            i = int(np.searchsorted(self._slots[:n], slot))
            if self._slots[i] == slot:
                return
        else:
            i = n
        if n == len(self._slots):
            self._slots = np.concatenate([self._slots, np.zeros(n, dtype=np.int32)])
        self._slots[i + 1 : n + 1] = self._slots[i:n]
        self._slots[i] = slot
        self._n = n + 1

    def discard(self, slot: int) -> None:
        n = self._n
        i = int(np.searchsorted(self._slots[:n], slot))
        if i < n and self._slots[i] == slot:
            self._slots[i : n - 1] = self._slots[i + 1 : n]
            self._n = n - 1


def union(groups: Iterable[SlotSet]) -> np.ndarray:
    """The slots of all ``groups``, ascending, each once (int64)."""
    arrays = [group.array() for group in groups if len(group)]
    if not arrays:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate(arrays)).astype(np.int64)


EMPTY = SlotSet()  # for lookups with a default; never added to
