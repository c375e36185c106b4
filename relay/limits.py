"""What one client may take from the relay beyond its session (concurrent sessions:
`core.connections.SessionLimiter`): AUTH attempts per address. A message's header section is bounded by
`pipeline.mime_bounds.header_refusal`, which the inbound server applies too."""

from __future__ import annotations

from core.host_counts import CountStore, ProcessCounts


class AuthLimiter:
    """AUTH attempts per client address. An attempt counts from before its key is looked up, so concurrent
    guesses cannot all be evaluated before the first failure is recorded: at most `limit` attempts, failed
    or still in flight, within `lockout_seconds` of the first; then the address is refused until the window
    ends. Each failure is answered more slowly than the last; a success clears the address. Counted in this
    process (the default) or in the table every acceptor process of this server shares
    (`core.host_counts.HostCounts`), so `limit` attempts are all an address gets however many acceptors its
    connections land on."""

    def __init__(self, limit: int, lockout_seconds: float, counts: CountStore | None = None) -> None:
        self.limit = limit
        self.lockout_seconds = lockout_seconds
        self.counts = counts or ProcessCounts()

    def _attempts_of(self, address: str) -> int:
        return self.counts.update(f"auth:{address}", lambda count, since, _now: (
            count, since, since + self.lockout_seconds))[0]

    def locked(self, address: str) -> bool:
        return self._attempts_of(address) >= self.limit

    def admit(self, address: str) -> bool:
        """Count one attempt before its key is checked; False (and not counted) when the address is locked."""
        admitted = False

        def count_one(count: int, since: float, now: float) -> tuple[int, float, float]:
            nonlocal admitted
            admitted = count < self.limit
            since = since if count else now
            return count + admitted, since, since + self.lockout_seconds

        self.counts.update(f"auth:{address}", count_one)
        return admitted

    def failure_delay(self, address: str) -> float:
        """How long to wait before answering a failed attempt: longer the more the address has tried."""
        return min(0.25 * max(self._attempts_of(address), 1), 2.0)

    def succeeded(self, address: str) -> None:
        self.counts.update(f"auth:{address}", lambda _count, since, _now: (0, since, 0.0))


