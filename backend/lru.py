"""A small thread-safe LRU mapping: the one bounded cache of the backend's per-process state.

Every in-process cache that grows with its inputs (parsed label configs, label spaces, upload
→ feature keys, the last spot answers) is one of these, so none can grow without bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()


class LRU(Generic[K, V]):
    """At most ``size`` entries; reading or writing an entry makes it the most recent one,
    writing past ``size`` drops the least recently used. Every method takes the cache's own
    lock, so threads may share one instance; ``get_or_create`` builds a missing value outside
    the lock (two threads missing the same key may both build it; the last one is kept)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an LRU cache needs room for at least one entry, got size={size}")
        self.size = int(size)
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            value = self._items.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def get_or_create(self, key: K, make: Callable[[], V]) -> V:
        value = self.get(key, _MISSING)
        return self.put(key, make()) if value is _MISSING else value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
