"""A bounded least-recently-used map with hit and miss counters, for the detectors' caches.

Why not `functools.lru_cache`: the caches are filled in batches (one model call encodes many
missing keys), their counters are exported as metrics, and a bound of 0 must mean "keep nothing".
Not thread-safe: each cache is owned by the scoring thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CountingLRU(Generic[K, V]):
    """At most `maxsize` entries; `get` counts a hit or a miss and refreshes the entry it finds."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def count_hit(self) -> None:
        """Count work avoided without a lookup (e.g. a duplicate inside the batch being filled)."""
        self.hits += 1

    def put(self, key: K, value: V) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
            self.evictions += 1

    def __contains__(self, key: object) -> bool:
        """Membership without touching counters or recency."""
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> tuple[int, int]:
        return self.hits, self.misses

    def clear(self) -> None:
        self._data.clear()


def split_cached(cache: CountingLRU[K, V], keys: Sequence[K]) -> tuple[dict[K, V], dict[K, int]]:
    """Split a batch's keys into cached values and the distinct keys still to compute (key -> first index).

    A key repeated inside the batch is computed once and counted as a hit: the work is avoided.
    """
    known: dict[K, V] = {}
    todo: dict[K, int] = {}
    for index, key in enumerate(keys):
        if key in known or key in todo:
            cache.count_hit()
            continue
        value = cache.get(key)
        if value is None:
            todo[key] = index
        else:
            known[key] = value
    return known, todo
