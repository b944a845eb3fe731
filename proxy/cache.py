"""The proxy's bounded caches: ``LRU`` (by entries) and ``FrequencyCache`` (by weight and use).

Every in-process cache of the proxy is one of these two, or ``functools.lru_cache`` for a pure
function of hashable arguments (token counts of fixed strings, stemmed words).

``LRU`` keeps the most recently used entries; enough where nothing scans through it (a cache
per session of what only that session's requests look up).

``FrequencyCache`` keeps what is used often, not merely what was used last.

A plain LRU loses its hot entries to any scan. A burst of sessions touched once or twice (a
batch job, a fleet of agents waking up, a throughput sweep) pushes out the sessions that an
agent comes back to every few seconds, and each of those then pays its cold path again: a
long session reads its transcript back and rebuilds its context view and its exchanges'
terms (docs/PERSISTENCE.md: Caches).

``FrequencyCache`` is W-TinyLFU (Einziger et al., 2017), with exact counts instead of a sketch
since its keys are sessions, a few hundred resident and a few thousand counted at most:

- every ``get`` counts a use of its key; every ``10 × entries`` uses all counts are halved, so
  popularity fades and keys used once are forgotten;
- a newcomer enters a small LRU window (a tenth of the capacity), so a session that starts
  being used is cached at once;
- what leaves the window enters the main part only if it has been used at least as often as
  each entry it would push out there (the least used, least recently used among equals);
  otherwise it is dropped. A burst of one-off sessions only churns the window, and a session in
  steady use, whose count grows, gets in over sessions that are no longer used.

Entries have weights (a transcript weighs its messages), bounded by ``capacity``; the number of
entries is bounded by ``max_entries``. Eviction scans the main part's entries, which is cheap at
this size and only happens on a miss. Event-loop thread only (no locking).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MIN_PERIOD = 160  # uses between two halvings when few entries are resident
_WINDOW_SHARE = 10  # the window holds 1/10 of the capacity


class LRU(Generic[K, V]):
    """At most ``size`` entries; the least recently used goes first. Event-loop thread only."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value of ``key`` (None when absent), now the most recently used."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class FrequencyCache(Generic[K, V]):
    def __init__(self, capacity: int, *, weigh: Callable[[V], int] | None = None, max_entries: int | None = None) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.max_entries = max_entries
        self._weigh = weigh
        self._window_capacity = capacity // _WINDOW_SHARE
        self._main_capacity = capacity - self._window_capacity
        # key → (value, weight), least recently used first
        self._window: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._main: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._window_weight = self._main_weight = 0
        self._counts: Counter[K] = Counter()  # uses since the counts were last halved, halved
        self._uses = 0
        self.hits = self.misses = self.rejected = self.evicted = 0

    @property
    def weight(self) -> int:
        return self._window_weight + self._main_weight

    def __len__(self) -> int:
        return len(self._window) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._main

    def __iter__(self) -> Iterator[K]:
        yield from self._window
        yield from self._main

    def get(self, key: K) -> V | None:
        """The value of ``key`` (None when absent); counts as a use of ``key`` either way."""
        self._count(key)
        region = self._region(key)
        if region is None:
            self.misses += 1
            return None
        self.hits += 1
        region.move_to_end(key)
        return region[key][0]

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without counting a use."""
        region = self._region(key)
        return None if region is None else region[key][0]

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key``; returns whether it is kept.

        A key already resident is updated (and re-weighed) in place; if that grows the window
        past its share, the key may leave it like any other entry. A newcomer enters the
        window; what the window then pushes out (possibly the newcomer itself, if it is
        heavier than the window) must earn its place in the main part. A value heavier than the
        main part (nine tenths of the capacity) is never kept."""
        weight = self._weigh(value) if self._weigh is not None else 1
        region = self._region(key)
        if region is not None and weight > self._main_capacity:  # grew past what the cache can hold
            self.pop(key)
            region = None
        if region is not None:
            delta = weight - region[key][1]
            region[key] = (value, weight)
            region.move_to_end(key)
            if region is self._window:
                self._window_weight += delta
                self._shrink_window()
            else:
                self._main_weight += delta
                self._shrink_main(keep=key)
            return key in self
        if weight > self._main_capacity or self.max_entries == 0:
            self.rejected += 1
            return False
        self._window[key] = (value, weight)
        self._window_weight += weight
        self._shrink_window()
        return key in self

    def pop(self, key: K) -> V | None:
        """Forget ``key``'s value (its use count stays)."""
        if key in self._window:
            value, weight = self._window.pop(key)
            self._window_weight -= weight
            return value
        if key in self._main:
            value, weight = self._main.pop(key)
            self._main_weight -= weight
            return value
        return None

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "weight": self.weight, "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "rejected": self.rejected, "evicted": self.evicted}

    # -- internals ---------------------------------------------------------------------------

    def _region(self, key: object) -> OrderedDict[K, tuple[V, int]] | None:
        if key in self._window:
            return self._window
        if key in self._main:
            return self._main
        return None

    def _count(self, key: K) -> None:
        self._counts[key] += 1
        self._uses += 1
        if self._uses >= max(_MIN_PERIOD, 10 * len(self)):
            self._uses = 0
            # Halve: what was popular a while ago counts half as much; keys used once are forgotten.
            self._counts = Counter({k: c // 2 for k, c in self._counts.items() if c > 1})

    def _too_many(self) -> bool:
        return self.max_entries is not None and len(self) > self.max_entries

    def _shrink_window(self) -> None:
        """Move the window's least recently used entries out while it is over its share (or
        the cache has too many entries): into the main part if they earn it, else away."""
        while self._window and (self._window_weight > self._window_capacity or self._too_many()):
            key, (value, weight) = self._window.popitem(last=False)
            self._window_weight -= weight
            if not self._admit(key, value, weight):
                self.rejected += 1

    def _admit(self, key: K, value: V, weight: int) -> bool:
        """Put ``key`` in the main part if it has been used at least as often as each entry
        that must go to make room for it; evict those."""
        if weight > self._main_capacity:
            return False
        uses = self._counts.get(key, 0)
        victims: list[K] = []
        freed = 0

        def fits() -> bool:  # ``key`` fits once ``victims`` are gone
            return self._main_weight - freed + weight <= self._main_capacity and not (
                self.max_entries is not None and len(self) - len(victims) + 1 > self.max_entries)

        for victim in self._least_used_first():
            if fits():
                break
            if self._counts.get(victim, 0) > uses:
                return False
            victims.append(victim)
            freed += self._main[victim][1]
        if not fits():
            return False
        for victim in victims:
            self._main_weight -= self._main.pop(victim)[1]
            self.evicted += 1
        self._main[key] = (value, weight)
        self._main_weight += weight
        return True

    def _least_used_first(self, keep: K | None = None) -> list[K]:
        """The main part's keys but ``keep``, least used first (least recently used among equals)."""
        position = {k: i for i, k in enumerate(self._main)}
        return sorted((k for k in self._main if k != keep), key=lambda k: (self._counts.get(k, 0), position[k]))

    def _shrink_main(self, keep: K) -> None:
        """Evict the main part's least used entries (never ``keep``) until it fits its share."""
        if self._main_weight <= self._main_capacity and not self._too_many():
            return
        for victim in self._least_used_first(keep):
            self._main_weight -= self._main.pop(victim)[1]
            self.evicted += 1
            if self._main_weight <= self._main_capacity and not self._too_many():
                return

