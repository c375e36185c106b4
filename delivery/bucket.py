"""The send-rate limiter shared by every dispatcher task of a process: the rate is for the node.

It schedules rather than counts (GCRA / virtual scheduling): each acquire is given the next free
slot, `1/rate` after the previous one, and sleeps until it. Sleeping late does not lose capacity
(the next slot is computed from the schedule, not from the clock) and an idle period banks nothing,
so over any window the number of sends is at most rate × window + 1 and, while there is work,
no fewer than rate × window − 1.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        self.rate = rate

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
