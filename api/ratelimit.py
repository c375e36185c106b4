"""Per-project request budget: a fixed one-minute window per node."""

from __future__ import annotations

import time
from dataclasses import dataclass


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


class WindowRateLimiter:
    def __init__(self, limit: int, window_seconds: int = 60) -> None:
        self.limit = limit
        self.window = window_seconds
        self._windows: dict[str, tuple[int, int]] = {}

    def take(self, project_id: str) -> Allowance:
        now = int(time.time())
        start = now - now % self.window
        window_start, used = self._windows.get(project_id, (start, 0))
        if window_start != start:
            window_start, used = start, 0
        allowed = used < self.limit
        if allowed:
            used += 1
        self._windows[project_id] = (window_start, used)
        return Allowance(allowed, self.limit, self.limit - used, window_start + self.window)
