"""Per-project request budget: a fixed one-minute window, per process or shared by the acceptor processes of
one server (`WindowRateLimiter`), or by every node on one PostgreSQL (`SharedWindowLimiter`; with several
acceptors too, both: `EveryLimit`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from core.host_counts import CountStore, ProcessCounts

log = logging.getLogger("plunkd.api")


@dataclass
class Allowance:
    allowed: bool
    limit: int
    remaining: int
    reset_epoch: int

    @property
    def retry_after(self) -> int:
        return max(1, self.reset_epoch - int(time.time()))

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset_epoch)}


class Limiter(Protocol):
    def take(self, project_id: str) -> Allowance: ...


class WindowRateLimiter:
    """A fixed window per project, counted in this process (the default) or in the table every acceptor
    process of this server shares (`core.host_counts.HostCounts`): exact over all of them, whichever one a
    connection lands on."""

    def __init__(self, limit: int, window_seconds: int = 60, counts: CountStore | None = None) -> None:
        self.counts = counts or ProcessCounts()
        self.limit = limit
        self.window = window_seconds

    def take(self, project_id: str) -> Allowance:
        admitted = False

        def count_one(used: int, since: float, now: float) -> tuple[int, float, float]:
            nonlocal admitted
            start = float(int(now) - int(now) % self.window)
            if since != start:
                used = 0
            admitted = used < self.limit
            return used + admitted, start, start + self.window

        used, start = self.counts.update(f"api:{project_id}", count_one)
        return Allowance(admitted, self.limit, max(0, self.limit - used), int(start) + self.window)


class EveryLimit:
    """Admits a request only if every limiter does, in order (one that refuses, the later ones do not see):
    this server's acceptors exactly (`WindowRateLimiter` on `HostCounts`), then the nodes on PostgreSQL
    (`SharedWindowLimiter`)."""

    def __init__(self, *limiters: Limiter) -> None:
        self.limiters = limiters

    def take(self, project_id: str) -> Allowance:
        allowances = []
        for limiter in self.limiters:
            allowance = limiter.take(project_id)
            if not allowance.allowed:
                return allowance
            allowances.append(allowance)
        return min(allowances, key=lambda allowance: allowance.remaining)


Counts = dict[tuple[str, int], int]
"""Requests per (project id, window start in epoch seconds)."""


class SharedWindowLimiter:
    """The same window, summed over the nodes: each node counts its own requests and every
    `sync_seconds` adds them to the shared count (`sync`: one upsert per project window) and learns the
    total. A request is admitted while the last known total plus this node's unsent count is under the
    limit. Worst case, a window admits the limit plus what the other nodes admitted in one sync interval
    and had not yet reported (with N nodes at R requests/s each: limit + (N−1)·R·sync_seconds); a node
    alone is exact. If the database cannot be reached the node goes on with its own count."""

    def __init__(self, limit: int, sync: Callable[[Counts, int], Awaitable[Counts]], window_seconds: int = 60,
                 sync_seconds: float = 0.5) -> None:
        self.limit = limit
        self.window = window_seconds
        self.sync_seconds = sync_seconds
        self._sync = sync
        self._known: Counts = {}
        self._unsent: Counts = {}
        self._flushing = asyncio.Lock()

    def take(self, project_id: str) -> Allowance:
        now = int(time.time())
        key = (project_id, now - now % self.window)
        used = self._known.get(key, 0) + self._unsent.get(key, 0)
        allowed = used < self.limit
        if allowed:
            self._unsent[key] = self._unsent.get(key, 0) + 1
            used += 1
        return Allowance(allowed, self.limit, max(0, self.limit - used), key[1] + self.window)

    async def flush(self) -> None:
        """Report this node's counts and learn the totals (of windows still current). One flush at a
        time: totals read by an earlier flush that finished later would overwrite newer ones."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        now = int(time.time())
        current = now - now % self.window
        counts = dict.fromkeys((key for key in self._known if key[1] == current), 0)
        counts.update(self._unsent)
        if not counts:
            return
        sent, self._unsent = self._unsent, {}
        try:
            totals = await self._sync(counts, current - self.window)
        except Exception as exc:
            for key, used in sent.items():
                self._unsent[key] = self._unsent.get(key, 0) + used
            log.warning("could not share the API request counts (%s); using this node's own meanwhile", exc)
            return
        self._known = {key: used for key, used in totals.items() if key[1] == current}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.sync_seconds)
            await self.flush()
