"""Per-slot metadata of one tenant's memories as numpy columns, and the usearch key -> slot map:
compact, vectorised structures (a Python object per memory costs megabytes at 100k)."""

from __future__ import annotations

import numpy as np

NONE = -1  # no user / no session


class Columns:
    """Per-slot metadata as growable numpy arrays (vectorised scope checks)."""

    def __init__(self) -> None:
        self.capacity = 0
        self.user = np.empty(0, dtype=np.int32)
        self.session = np.empty(0, dtype=np.int32)
        self.kind = np.empty(0, dtype=np.int8)
        self.ts = np.empty(0, dtype=np.float64)
        self.alive = np.empty(0, dtype=bool)
        self.texthash = np.empty(0, dtype=np.int64)
        self.ukey = np.empty(0, dtype=np.uint64)
        self.seq = np.empty(0, dtype=np.int64)

    def ensure(self, slot: int) -> None:
        if slot < self.capacity:
            return
        size = max(1024, self.capacity * 2, slot + 1)
        for name, fill in (("user", NONE), ("session", NONE), ("kind", 0), ("ts", 0.0), ("alive", False), ("texthash", 0), ("ukey", 0), ("seq", -1)):
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.capacity = size


class KeySlots:
    """usearch key -> slot, for live memories: an int32 array indexed by key (keys are handed
    out in sequence), not a dict of 100k ints (6.4 MB). A key far beyond the others (a record
    written elsewhere) goes to a dict instead of stretching the array."""

    def __init__(self) -> None:
        self._slots = np.full(0, -1, dtype=np.int32)
        self._far: dict[int, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def get(self, key: int, default: int | None = None) -> int | None:
        if 0 <= key < len(self._slots):
            slot = int(self._slots[key])
            return default if slot < 0 else slot
        return self._far.get(key, default)

    def __setitem__(self, key: int, slot: int) -> None:
        self.pop(key)
        if 0 <= key < max(1 << 20, 4 * self._count):
            if key >= len(self._slots):
                size = min(max(key + 1, 2 * len(self._slots), 1024), max(1 << 20, 4 * self._count))
                self._slots = np.concatenate([self._slots, np.full(size - len(self._slots), -1, dtype=np.int32)])
            self._slots[key] = slot
        else:
            self._far[key] = slot
        self._count += 1

    def pop(self, key: int, default: int | None = None) -> int | None:
        slot = self.get(key)
        if slot is None:
            return default
        if 0 <= key < len(self._slots):
            self._slots[key] = -1
        else:
            del self._far[key]
        self._count -= 1
        return slot

    def values(self) -> list[int]:
        return self._slots[self._slots >= 0].tolist() + list(self._far.values())

    def array(self) -> np.ndarray:
        """The live slots as an int64 array (``values`` without a Python int per slot)."""
        far = np.fromiter(self._far.values(), dtype=np.int64, count=len(self._far))
        return np.concatenate([self._slots[self._slots >= 0].astype(np.int64), far])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slots of ``keys`` (-1 for a key without a live memory), vectorised."""
        keys = np.asarray(keys, dtype=np.uint64)
        near = keys < len(self._slots)
        found = np.full(len(keys), -1, dtype=np.int64)
        found[near] = self._slots[keys[near].astype(np.int64)]
        for i in np.flatnonzero(~near).tolist():
            found[i] = self._far.get(int(keys[i]), -1)
        return found
