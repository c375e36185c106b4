"""A small time-bounded cache for answers that every request or SMTP command would otherwise read from
the database (which key is whose, which sender domain is verified)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class TtlCache(Generic[K, V]):
    """Entries live `ttl` seconds; at `max_entries` the cache starts over (a flood of distinct keys
    cannot grow it)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key: K, default: D | None = None) -> V | D | None:
        """The live value, or `default` (pass a sentinel where None is a value worth caching)."""
        hit = self._entries.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return default
        return hit[1]

    def __contains__(self, key: K) -> bool:
        hit = self._entries.get(key)
        return hit is not None and hit[0] > time.monotonic()

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def discard_where(self, doomed: Callable[[V], bool]) -> None:
        """Drop every entry whose value `doomed` says so."""
        for key in [key for key, (_, value) in self._entries.items() if doomed(value)]:
            del self._entries[key]
