"""proxy/cache.py: bounded by weight and entries, frequency before recency, exact bookkeeping."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.cache import FrequencyCache


def test_hot_keys_survive_a_scan_of_keys_used_once() -> None:
    cache: FrequencyCache[str, str] = FrequencyCache(8)
    hot = [f"hot{i}" for i in range(6)]
    for _ in range(3):
        for key in hot:
            if cache.get(key) is None:
                assert cache.put(key, key)
    for i in range(100):  # a burst of one-off keys, each read then offered
        key = f"once{i}"
        assert cache.get(key) is None
        cache.put(key, key)
    assert all(cache.get(key) == key for key in hot)
    assert len(cache) == 8 and cache.evicted == 98  # the one-off keys only took each other's place


def test_a_plain_lru_would_have_lost_them() -> None:
    """The same scan, every key used equally often: the cache falls back to least recently used."""
    cache: FrequencyCache[str, str] = FrequencyCache(3)
    for key in "abc":
        cache.get(key)
        cache.put(key, key)
    cache.get("a")  # a: used twice, b and c once
    cache.get("d")
    assert cache.put("d", "d")  # d (once) ties with b and c: the least recently used, b, goes
    assert list(cache) == ["c", "a", "d"]


def test_a_key_in_steady_use_gets_in_even_when_the_cache_is_full_of_formerly_hot_keys() -> None:
    cache: FrequencyCache[str, int] = FrequencyCache(4)
    for _ in range(50):
        for key in "abcd":
            if cache.get(key) is None:
                cache.put(key, 0)
    admitted_after = None
    for use in range(1, 2000):  # "e" is now the only key in use
        if cache.get("e") is None:
            if cache.put("e", use):
                admitted_after = use
                break
    assert admitted_after is not None and admitted_after < 500  # the old counts fade by halving
    assert "e" in cache and len(cache) == 4


def test_a_new_key_is_cached_at_once_in_the_window_even_over_keys_used_more() -> None:
    cache: FrequencyCache[str, int] = FrequencyCache(100)  # a window of 10, a main part of 90
    for _ in range(5):
        for i in range(100):
            if cache.get(f"hot{i}") is None:
                cache.put(f"hot{i}", i)
    assert cache.get("new") is None
    assert cache.put("new", 1) and cache.get("new") == 1  # used once, cached anyway
    for i in range(20):  # a scan of one-off keys goes through the window only
        cache.get(f"once{i}")
        cache.put(f"once{i}", i)
    assert "new" not in cache and sum(f"hot{i}" in cache for i in range(100)) == 90
    assert len(cache) == 100 and cache.weight == 100


def test_weighted_newcomer_evicts_what_it_needs_only_if_it_beats_each_victim() -> None:
    cache: FrequencyCache[str, list[int]] = FrequencyCache(11, weigh=len)  # window 1, main 10
    for key, size, uses in (("a", 4, 1), ("b", 4, 3), ("c", 2, 1)):
        for _ in range(uses):
            cache.get(key)
        cache.put(key, [0] * size)  # heavier than the window: straight to the main part
    assert list(cache) == ["a", "b", "c"] and cache.weight == 10
    cache.get("big")
    cache.get("big")
    assert not cache.put("big", [0] * 7)  # would need b (used 3 times) out too
    assert list(cache) == ["a", "b", "c"] and cache.weight == 10
    assert cache.put("mid", [0] * 5) is False  # used 0 times: loses to a and c (once each)
    cache.get("mid")
    assert cache.put("mid", [0] * 5)  # once: ties a and c, which go (least recently used first)
    assert sorted(cache) == ["b", "mid"] and cache.weight == 9
    assert not cache.put("huge", [0] * 11)  # heavier than the main part: never kept


def test_resident_update_reweighs_and_never_evicts_itself() -> None:
    cache: FrequencyCache[str, list[int]] = FrequencyCache(10, weigh=len, max_entries=3)  # window 1, main 9
    for key in "abc":
        cache.get(key)
        cache.put(key, [0] * 3)
    assert list(cache) == ["a", "b", "c"]
    assert cache.put("c", [0] * 8)  # grows past the others' room: they go, c stays
    assert list(cache) == ["c"] and cache.weight == 8
    assert cache.pop("c") == [0] * 8 and cache.weight == 0 and cache.pop("c") is None
    cache.put("c", [0] * 3)
    assert not cache.put("c", [0] * 10)  # grew past the main part (9): dropped
    assert "c" not in cache and cache.weight == 0


def test_entry_bound_and_disabled_cache() -> None:
    cache: FrequencyCache[int, int] = FrequencyCache(100, max_entries=2)
    for key in range(5):
        cache.get(key)
        cache.put(key, key)
        assert len(cache) <= 2
    assert len(cache) == 2
    off: FrequencyCache[int, int] = FrequencyCache(0)
    off.get(1)
    assert not off.put(1, 1) and len(off) == 0 and off.get(1) is None


class CacheModel(RuleBasedStateMachine):
    """Whatever the operations: the bounds hold, the weight is the sum of what is resident, and
    every resident value is the last one put under its key."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: FrequencyCache[int, tuple[int, int]] = FrequencyCache(30, weigh=lambda v: v[1], max_entries=5)
        self.last: dict[int, tuple[int, int]] = {}
        self.version = 0

    @rule(key=st.integers(0, 12))
    def get(self, key: int) -> None:
        found = self.cache.get(key)
        assert found is None or found == self.last[key]

    @rule(key=st.integers(0, 12), weight=st.integers(0, 35))
    def put(self, key: int, weight: int) -> None:
        self.version += 1
        value = (self.version, weight)
        kept = self.cache.put(key, value)
        if kept:
            self.last[key] = value
        assert kept == (key in self.cache)
        if weight > 27:  # heavier than the main part: never kept, resident or not
            assert not kept

    @rule(key=st.integers(0, 12))
    def pop(self, key: int) -> None:
        self.cache.pop(key)
        assert key not in self.cache

    @invariant()
    def bookkeeping(self) -> None:
        values = [self.cache.peek(k) for k in self.cache]
        assert self.cache.weight == sum(v[1] for v in values)
        assert len(self.cache) <= 5
        assert self.cache.weight <= 30
        for key in self.cache:
            assert self.cache.peek(key) == self.last[key]


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_lru_keeps_the_most_recently_used_entries() -> None:
    from proxy.cache import LRU

    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now the most recent
    cache.put("c", 3)  # "b" goes
    assert "b" not in cache and cache.get("b") is None and len(cache) == 2
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert cache.pop("a") == 1 and cache.pop("a") is None and len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.get("c") is None
