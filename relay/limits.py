"""What one client may take from the relay beyond its session (concurrent sessions:
`core.connections.SessionLimiter`): AUTH attempts per address, and the size of a message's header section."""

from __future__ import annotations

import re

from core.host_counts import CountStore, ProcessCounts
from pipeline.submit import header_end


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


MAX_HEADER_LINES = 1000
"""Lines of a message's header section (folded lines count), before the blank line that ends it."""
MAX_HEADER_FIELD_BYTES = 64 * 1024
"""Bytes of one header field: its first line and its folded lines with their line breaks, not its last."""
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
"""Where the email package's parser ends a line: CRLF, or a bare CR or LF."""


def header_refusal(raw: bytes) -> str | None:
    """The reply refusing a message whose header section is over `MAX_HEADER_LINES` lines or holds a field
    over `MAX_HEADER_FIELD_BYTES` bytes, or None. Checked before anything parses the header, so the work is
    a count, then at most `MAX_HEADER_LINES` steps.

    552 5.3.4 (RFC 3463: "message too big for system"): the message is well formed and only over a limit
    of this system; 5.6.x would say its content or format is wrong. Postfix answers its message size
    limit with the same code, and so does this relay (`relay.server.REPLY_REWRITES`)."""
    end = header_end(raw)
    lines = raw.count(b"\n", 0, end) + raw.count(b"\r", 0, end) - raw.count(b"\r\n", 0, end)
    if lines > MAX_HEADER_LINES:
        return (f"552 5.3.4 Message header too big: more than {MAX_HEADER_LINES} lines before the blank line "
                "that ends the header")
    longest = field_start = 0
    for line_break in LINE_BREAK.finditer(raw, 0, end):
        next_line = line_break.end()
        if next_line < end and raw[next_line:next_line + 1] in (b" ", b"\t"):
            continue  # a folded line: the same field goes on
        longest = max(longest, line_break.start() - field_start)
        field_start = next_line
    if max(longest, end - field_start) > MAX_HEADER_FIELD_BYTES:
        return f"552 5.3.4 Message header too big: a header field is longer than {MAX_HEADER_FIELD_BYTES} bytes"
    return None
