"""`DueLoop`: a background loop that works through whatever is due and, when nothing is, sleeps until the
earliest thing is due, a `wake()`, or `poll_seconds` at most (the poll finds what another process or
node made due, which cannot wake this one). Like `core.config`, it imports nothing of the project.

Wake-ups come once per accepted message (the relay and the API wake every loop of the node when they
queue mail), so a loop answers them at most once per `wake_gap_seconds`: the wake-ups of a burst share one
step (one claim, one read) instead of each paying a transaction. A busy step (more is due at once) is
followed by the next without waiting."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime


class DueLoop:
    def __init__(self, poll_seconds: float, log: logging.Logger, what: str, wake_gap_seconds: float = 0.1) -> None:
        self.poll_seconds = poll_seconds
        self.wake_gap_seconds = wake_gap_seconds
        """After a step that found nothing more, a wake-up waits until this long after that step began (or
        until the earliest item is due, if that comes first)."""
        self.next_due: datetime | None = None
        """When the earliest item is due, as `step` last saw it (None: nothing known, poll)."""
        self._log = log
        self._what = what
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something may be due now: look now instead of at the next poll."""
        self._wake.set()

    async def step(self) -> bool:
        """Work through one batch; True when more may be due at once."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the loop holds; called when `run` ends."""

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                began = time.monotonic()
                try:
                    busy = await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._log.exception("%s failed; retrying", self._what)
                    busy = False
                if busy:
                    await asyncio.sleep(0)
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_seconds())
                except TimeoutError:
                    continue
                gap = min(began + self.wake_gap_seconds - time.monotonic(), self._idle_seconds())
                if gap > 0:
                    await asyncio.sleep(gap)
        finally:
            await self.close()

    def _idle_seconds(self) -> float:
        if self.next_due is None:
            return self.poll_seconds
        return max(0.0, min(self.poll_seconds, (self.next_due - datetime.now(UTC)).total_seconds()))
