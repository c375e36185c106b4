"""Counters that the acceptor processes of one `plunkd serve` share (`server.processes` > 1): a fixed table of
slots in a file every one of them maps into memory, each change made under an exclusive `flock`. So the
per-project API limit and the SMTP AUTH lockout count every acceptor's requests at once, exactly, instead
of each process counting alone (N processes would admit N times the limit).

Why not the database: a write per API request or AUTH attempt would cost more than the request, and on
SQLite every acceptor would queue for the one write lock. A change here is two system calls and a few
struct reads (microseconds), and the table is the same size however many keys are counted.

A slot holds a key's digest, its count, when its count started (`since`) and when the slot may be reused
(`expires`). A key lives in one of `PROBES` slots after its digest's home; when all of them hold other live
keys, the one that expires first is taken over (its count starts again, as the in-process limiters start
over when they are full)."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from core.files import PRIVATE_FILE

SLOTS = 1 << 16
PROBES = 16
SLOT = struct.Struct("<16sqdd")
"""digest of the key, count, since (epoch seconds), expires (epoch seconds)."""
EMPTY_DIGEST = bytes(16)

Change = Callable[[int, float, float], tuple[int, float, float]]
"""(count, since, now) → (count, since, expires): a key's new state from its current one (0, 0.0 when it has
none or it expired). A count of 0 frees the slot."""


class HostCounts:
    def __init__(self, path: Path, fresh: bool = False) -> None:
        """Map the table at `path`; `fresh`: make it anew, all slots empty (the main process, at start)."""
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if fresh else 0)
        self._fd = os.open(path, flags, PRIVATE_FILE)
        if fresh:
            os.ftruncate(self._fd, SLOTS * SLOT.size)
        self._map = mmap.mmap(self._fd, SLOTS * SLOT.size)

    def update(self, key: str, change: Change) -> tuple[int, float]:
        """Apply `change` to `key`'s state, atomically over every process; returns its new (count, since)."""
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        home = int.from_bytes(digest[:8], "little") % SLOTS
        now = time.time()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slot, held, count, since = self._find(digest, home, now)
            count, since, expires = change(count, since, now)
            offset = slot * SLOT.size
            if count <= 0:
                if held:
                    SLOT.pack_into(self._map, offset, EMPTY_DIGEST, 0, 0.0, 0.0)
            else:
                SLOT.pack_into(self._map, offset, digest, count, since, expires)
            return count, since
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, digest: bytes, home: int, now: float) -> tuple[int, bool, int, float]:
        """The slot holding `digest` (True) with its live count and since; else the first free or expired slot,
        else the slot that expires first (False), with (0, 0.0)."""
        reusable = None
        soonest, soonest_expiry = home, float("inf")
        for step in range(PROBES):
            slot = (home + step) % SLOTS
            held, count, since, expires = SLOT.unpack_from(self._map, slot * SLOT.size)
            if held == digest:
                return (slot, True, count, since) if expires > now else (slot, True, 0, 0.0)
            if reusable is None and (held == EMPTY_DIGEST or expires <= now):
                reusable = slot
            if expires < soonest_expiry:
                soonest, soonest_expiry = slot, expires
        return (soonest if reusable is None else reusable), False, 0, 0.0

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class ProcessCounts:
    """`HostCounts`' interface for one process counting alone (`server.processes` = 1): a dict, so the limiters
    built on `update` are one piece of code whether one process counts or all acceptors do. At `max_keys` it
    starts over (a flood of distinct keys cannot grow it)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._states: dict[str, tuple[int, float, float]] = {}

    def update(self, key: str, change: Change) -> tuple[int, float]:
        now = time.time()
        count, since, expires = self._states.get(key, (0, 0.0, 0.0))
        if expires <= now:
            count, since = 0, 0.0
        count, since, expires = change(count, since, now)
        if count <= 0:
            self._states.pop(key, None)
        else:
            if len(self._states) >= self.max_keys and key not in self._states:
                self._states.clear()
            self._states[key] = (count, since, expires)
        return count, since


class CountStore(Protocol):
    """Where a limiter keeps its counts: this process's (`ProcessCounts`) or every acceptor's (`HostCounts`)."""

    def update(self, key: str, change: Change) -> tuple[int, float]: ...


class SharedGeneration:
    """A number every acceptor process can read and raise, kept in a `HostCounts` slot that never expires:
    a process that sees it changed since it last looked knows another one changed something."""

    def __init__(self, counts: HostCounts, name: str) -> None:
        self.counts = counts
        self.name = f"generation:{name}"

    def current(self) -> int:
        return self.counts.update(self.name, lambda count, since, _now: (count, since, float("inf")))[0]

    def advance(self) -> int:
        return self.counts.update(self.name, lambda count, since, _now: (count + 1, since, float("inf")))[0]
