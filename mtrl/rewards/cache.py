"""The reward pipeline's caches: at most ``reward.cache_size`` entries each, the least recently used evicted first.

The rewarder caches the detector's spans and the scorer's sentence scores, the R3HF redistributor its
prefix scores, all keyed by (source, hypothesis, reference). A long run sees new keys at every step, so
each cache is bounded (:class:`LRUCache`); ``size`` 0 keeps nothing (a key repeated within one batch is
still computed once).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any


class LRUCache:
    """A mapping of at most ``size`` entries; a read or a write makes an entry the most recently used.

    ``hits`` and ``misses`` count the keys :meth:`get_many` was asked for: a miss is a distinct key it had to
    compute, every other key (one in the cache, or a repeat within the batch) a hit.
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:  # does not count as a use
        return key in self._data

    def clear(self) -> None:
        """Forget every entry (a benchmark that must score afresh); the hit counts stay."""
        self._data.clear()

    def put(self, key: Hashable, value: Any) -> None:
        if self.size == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def get_many(self, keys: Sequence[Hashable], compute: Callable[[list], Sequence[Any]]) -> list:
        """The values of ``keys``, in order: cached ones read, the missing ones computed in one call of ``compute``
        (each distinct key once; it returns one value per key given, in order) and then cached.

        The values are returned from this call, not read back from the cache, so that a batch with more
        distinct keys than the cache holds still gets every value.
        """
        found: dict[Hashable, Any] = {}
        for k in keys:
            if k not in found and k in self._data:
                self._data.move_to_end(k)
                found[k] = self._data[k]
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            values = list(compute(todo))
            if len(values) != len(todo):
                raise RuntimeError(f"computed {len(values)} values for {len(todo)} keys")
            found.update(zip(todo, values))
            for k, v in zip(todo, values):
                self.put(k, v)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        return [found[k] for k in keys]
