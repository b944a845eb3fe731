"""A bounded cache that keeps what is used often, not merely what was used last.

A plain LRU loses its hot entries to any scan. A burst of sessions touched once or twice (a
batch job, a fleet of agents waking up, a throughput sweep) pushes out the sessions that an
agent comes back to every few seconds, and each of those then pays its cold path again: a
1,000-message session reads its transcript back (~7 ms) and rebuilds its context view and
its exchanges' terms (~10 ms).

``FrequencyCache`` counts accesses per key and halves every count after ``10 × entries``
accesses, so popularity fades and a key that is no longer used loses its place. When room
is needed it evicts the least used entries (least recently used among equals), and a
newcomer is admitted only if it is used at least as often as every entry it would push out:
TinyLFU's admission rule (Einziger et al., 2017), with exact counts instead of a sketch, since
the keys here are sessions, a few hundred resident and a few thousand counted at most. A
newcomer rejected now comes back with a higher count: a session in steady use gets in within a
few requests. Eviction scans the resident entries, which is cheap at this size and only
happens on a miss.

Entries have weights (a transcript weighs its messages), bounded by ``capacity``; the number
of entries is bounded by ``max_entries``. Event-loop thread only (no locking).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MIN_PERIOD = 160  # accesses between two halvings when few entries are resident


class FrequencyCache(Generic[K, V]):
    def __init__(self, capacity: int, *, weigh: Callable[[V], int] | None = None, max_entries: int | None = None) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.max_entries = max_entries
        self._weigh = weigh
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # least recently used first
        self._counts: Counter[K] = Counter()  # accesses since the counts were last halved, halved
        self._accesses = 0
        self.weight = 0
        self.hits = self.misses = self.rejected = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def get(self, key: K) -> V | None:
        """The value of ``key`` (None when absent); counts as a use of ``key`` either way."""
        self._count(key)
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without counting a use."""
        found = self._entries.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key`` if it earns its place; returns whether it is kept.

        A key already resident is always updated (and re-weighed). A newcomer is kept if it fits,
        or if it has been used at least as often as each entry that would be evicted for it."""
        weight = self._weigh(value) if self._weigh is not None else 1
        if key in self._entries:
            self.weight += weight - self._entries[key][1]
            self._entries[key] = (value, weight)
            self._entries.move_to_end(key)
            self._make_room(keep=key)
            return True
        if not self._fits(weight, 1):  # alone over the bounds (or the cache is off: capacity 0)
            self.rejected += 1
            return False
        victims = self._victims(key, weight)
        if victims is None:
            self.rejected += 1
            return False
        for victim in victims:
            self._drop(victim)
            self.evicted += 1
        self._entries[key] = (value, weight)
        self.weight += weight
        return True

    def pop(self, key: K) -> V | None:
        """Forget ``key``'s value (its use count stays)."""
        if key not in self._entries:
            return None
        return self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self.weight = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "weight": self.weight, "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "rejected": self.rejected, "evicted": self.evicted}

    # -- internals ---------------------------------------------------------------------------

    def _count(self, key: K) -> None:
        self._counts[key] += 1
        self._accesses += 1
        if self._accesses >= max(_MIN_PERIOD, 10 * len(self._entries)):
            self._accesses = 0
            # Halve: what was popular a while ago counts half as much; keys used once are forgotten.
            self._counts = Counter({k: c // 2 for k, c in self._counts.items() if c > 1})

    def _fits(self, weight: int, entries: int) -> bool:
        return weight <= self.capacity and (self.max_entries is None or entries <= self.max_entries)

    def _eviction_order(self, keep: K | None = None) -> list[K]:
        """Resident keys, least used first (least recently used among equals)."""
        position = {key: i for i, key in enumerate(self._entries)}
        return sorted((k for k in self._entries if k != keep), key=lambda k: (self._counts.get(k, 0), position[k]))

    def _victims(self, key: K, weight: int) -> list[K] | None:
        """The entries to evict to make room for newcomer ``key`` of ``weight`` (None: one of
        them is used more often than ``key``, which is then not admitted)."""
        if self._fits(self.weight + weight, len(self._entries) + 1):
            return []
        uses = self._counts.get(key, 0)
        victims: list[K] = []
        freed = 0
        for victim in self._eviction_order():
            if self._counts.get(victim, 0) > uses:
                return None
            victims.append(victim)
            freed += self._entries[victim][1]
            if self._fits(self.weight - freed + weight, len(self._entries) - len(victims) + 1):
                break
        return victims

    def _make_room(self, keep: K) -> None:
        """Evict the least used entries (never ``keep``) until the bounds hold."""
        if self._fits(self.weight, len(self._entries)):
            return
        for victim in self._eviction_order(keep):
            self._drop(victim)
            self.evicted += 1
            if self._fits(self.weight, len(self._entries)):
                return

    def _drop(self, key: K) -> V:
        value, weight = self._entries.pop(key)
        self.weight -= weight
        return value
