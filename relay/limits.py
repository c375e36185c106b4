"""AUTH attempts per client address (concurrent sessions: `plunkd.connections.SessionLimiter`)."""

from __future__ import annotations

import time


class AuthLimiter:
    """AUTH attempts per client address. An attempt counts from before its key is looked up, so concurrent
    guesses cannot all be evaluated before the first failure is recorded: at most `limit` attempts, failed
    or still in flight, within `lockout_seconds` of the first; then the address is refused until the window
    ends. Each failure is answered more slowly than the last; a success clears the address."""

    def __init__(self, limit: int, lockout_seconds: float) -> None:
        self.limit = limit
        self.lockout_seconds = lockout_seconds
        self._attempts: dict[str, tuple[int, float]] = {}

    def locked(self, address: str) -> bool:
        count, since = self._attempts.get(address, (0, 0.0))
        if count and time.monotonic() - since > self.lockout_seconds:
            self._attempts.pop(address, None)
            return False
        return count >= self.limit

    def admit(self, address: str) -> bool:
        """Count one attempt before its key is checked; False (and not counted) when the address is locked."""
        if self.locked(address):
            return False
        count, since = self._attempts.get(address, (0, time.monotonic()))
        if len(self._attempts) >= 100_000 and address not in self._attempts:
            self._attempts.clear()
        self._attempts[address] = (count + 1, since)
        return True

    def failure_delay(self, address: str) -> float:
        """How long to wait before answering a failed attempt: longer the more the address has tried."""
        count = self._attempts.get(address, (1, 0.0))[0]
        return min(0.25 * count, 2.0)

    def succeeded(self, address: str) -> None:
        self._attempts.pop(address, None)
