"""The send-rate limiters: `TokenBucket` for one node (SQLite), `SharedBucket` for every node on one
PostgreSQL (the rate is for the whole cluster, as a provider's quota is).

Both schedule rather than count (GCRA / virtual scheduling): each acquire is given the next free
slot, `1/rate` after the previous one, and sleeps until it. Sleeping late does not lose capacity
(the next slot is computed from the schedule, not from the clock) and an idle period banks nothing,
so over any window the number of sends is at most rate × window + 1 and, while there is work,
no fewer than rate × window − 1.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from storage.cluster import Reservation

log = logging.getLogger("plunkd.delivery")
CLOCK_SLACK = 0.005
"""How late (s) a reservation's first slot may be found, mapped from the database's clock onto this
process's (the reply's time and the event loop's delay), and still be used."""


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float = 1.0) -> None:
        """Wait for the slot of `tokens` sends (SES counts recipients, so a message may take several)."""
        if self.rate <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + tokens / self.rate
            delay = slot - now
            if delay > 0:
                await asyncio.sleep(delay)


class SharedBucket:
    """The cluster's send rate: slots come from one schedule in the database (`storage.cluster`), taken
    in reservations of at most `batch_seconds` of slots, then handed out locally one `1/rate` apart, as
    `TokenBucket` does. A reservation is as big as the sends waiting now, or twice the last one when that
    was used up (a busy node's senders come back one at a time, so the queue alone undercounts them):
    a node with sporadic mail takes one slot at a time and holds back no one. Reserved spans of different nodes
    never overlap and each node sends inside its own, so together they hold the rate (any window of W
    seconds has at most rate × W + 1 sends). A node that dies loses at most its unspent reservation; a
    node with nothing to send reserves nothing."""

    def __init__(self, reserve: Callable[[float], Awaitable[Reservation]], rate: float,
                 batch_seconds: float = 0.2) -> None:
        self.rate = rate
        self.batch_seconds = batch_seconds
        self._reserve = reserve
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._next = 0.0
        """Local (monotonic) time of the next free slot in the current reservation."""
        self._end = 0.0
        """Local time at which the current reservation ends."""
        self.reservations = 0
        self._last_size = 0
        self._handed = 0

    async def acquire(self, tokens: float = 1.0) -> float:
        """Wait for the next slot; returns its (monotonic) time. Waking from the sleep can be late by the
        event loop's delay: the schedule holds the rate, the moments the sends leave jitter around it."""
        if self.rate <= 0:
            return time.monotonic()
        self._waiting += 1
        try:
            async with self._lock:
                need = tokens / self.rate
                slot = max(time.monotonic(), self._next)
                if slot + need > self._end + 1e-6:
                    slot = await self._take_more(need)
                self._next = slot + need
                self._handed += 1
                delay = slot - time.monotonic()
        finally:
            self._waiting -= 1
        if delay > 0:
            await asyncio.sleep(delay)
        return slot

    async def _take_more(self, need: float) -> float:
        """A new reservation, sized to the sends waiting (at least this one); returns the first slot in it
        that has not passed. A reply that came late (a busy event loop) may find its first slots gone:
        they are lost, not sent late, since the next node's slots follow them (at most 3 tries)."""
        per_batch = max(1, int(self.rate * self.batch_seconds))
        wanted = self._waiting
        if self._last_size and self._handed >= self._last_size:
            wanted = max(wanted, 2 * self._last_size)
        size = max(1, min(wanted, per_batch))
        self._last_size, self._handed = size, 0
        span = max(need, size / self.rate)
        for _ in range(3):
            granted = await self._reserve(span)
            here = time.monotonic()
            start = here + (granted.start - granted.now)
            self._end = start + span  # not from granted.end: epoch seconds carry only ~0.2 µs of precision
            self.reservations += 1
            late = here - start - CLOCK_SLACK
            first = start if late <= 0 else start + math.ceil(late / need) * need
            if first + need <= self._end + 1e-6:
                return first
            log.warning("a send-rate reservation arrived %.0f ms after its slots; taking another", late * 1000)
        return max(here, start)
