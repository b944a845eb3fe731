"""In-process backend for tests: the same key layout and logic as LMDB, over a dict."""

from __future__ import annotations

import asyncio
import bisect
from typing import Callable, Iterator, TypeVar

from proxy.storage.kv import KVStore

T = TypeVar("T")


class _DictTxn:
    def __init__(self, data: dict[bytes, bytes], keys: list[bytes]) -> None:
        self._data, self._keys = data, keys

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = bytes(value)

    def delete(self, key: bytes) -> None:
        if self._data.pop(key, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, key)]

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        index = bisect.bisect_left(self._keys, max(prefix, start or prefix))
        while index < len(self._keys) and self._keys[index].startswith(prefix):
            key = self._keys[index]
            yield key, self._data[key]
            index += 1


class InMemoryStore(KVStore):
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []
        self._lock = asyncio.Lock()

    async def _read(self, fn: Callable[[_DictTxn], T]) -> T:
        return fn(_DictTxn(self._data, self._keys))

    async def _write(self, fn: Callable[[_DictTxn], T]) -> T:
        async with self._lock:
            # Transactions: work on copies, swap in only when the whole write succeeded.
            data, keys = dict(self._data), list(self._keys)
            result = fn(_DictTxn(data, keys))
            self._data, self._keys = data, keys
            return result

    def raw(self) -> dict[bytes, bytes]:
        """Direct access for corruption tests."""
        return self._data
