"""Who a key belongs to, with a short-lived cache: every API request and every SMTP AUTH asks, and a
database read per ask costs more than the rest of a small request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

from core.host_counts import SharedGeneration
from pipeline.cache import TtlCache
from storage.db import Database
from storage.projects import find_project_by_key


class _Unknown(Enum):
    """Not in the cache (a cached None is a known answer: no project has that key)."""

    KEY = "unknown key"


@dataclass(frozen=True)
class Caller:
    """The project a key belongs to, and which of its keys it is."""

    project_id: str
    project_name: str
    from_email: str
    from_name: str
    key_kind: str  # "secret" or "public"


class KeyCache:
    """Keyed by the key itself (the process holds it anyway). A rotated key stops working within `ttl`
    seconds on every process that cached it; `forget()` drops the cache at once (and, with `share_changes`,
    every acceptor's)."""

    def __init__(self, db: Database, ttl: float = 5.0) -> None:
        self.db = db
        self._owners: TtlCache[str, Caller | None] = TtlCache(ttl)
        self._changes: SharedGeneration | None = None
        self._changes_seen = 0
        self._reading: dict[str, asyncio.Future[Caller | None]] = {}
        self._forgets = 0  # raised by every forget: a read that began before one must not cache its answer

    def share_changes(self, changes: SharedGeneration) -> None:
        """The acceptor processes of one server on SQLite (no NOTIFY to tell them): a change of keys forgotten
        here raises `changes`, and every process forgets all it cached at its next lookup after that."""
        self._changes = changes
        self._changes_seen = changes.current()

    def forget(self) -> None:
        self._reads_now_stale()
        self._owners.clear()
        self._announce()

    def forget_project(self, project_id: str) -> None:
        """Drop the cached answers that name this project (its keys changed)."""
        self._reads_now_stale()
        self._owners.discard_where(lambda caller: caller is not None and caller.project_id == project_id)
        self._announce()

    def _reads_now_stale(self) -> None:
        """Keys changed: a read begun before keeps its answer out of the cache, and later lookups do not share it."""
        self._forgets += 1
        self._reading.clear()

    def _announce(self) -> None:
        if self._changes is not None:
            self._changes_seen = self._changes.advance()

    async def lookup(self, key: str) -> Caller | None:
        if self._changes is not None and (seen := self._changes.current()) != self._changes_seen:
            self._changes_seen = seen
            self._reads_now_stale()
            self._owners.clear()
        cached = self._owners.get(key, _Unknown.KEY)
        if cached is not _Unknown.KEY:
            return cached
        reading = self._reading.get(key)
        if reading is None:  # the first miss reads; the lookups of the same key meanwhile share its answer
            reading = asyncio.ensure_future(self._read(key, self._forgets))
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._reading.pop(key) if self._reading.get(key) is done else None)
        return await asyncio.shield(reading)

    async def _read(self, key: str, forgets_before: int) -> Caller | None:
        found = await self.db.read(find_project_by_key, key)
        caller = None
        if found is not None:
            project, kind = found
            caller = Caller(project.id, project.name, project.from_email, project.from_name, kind)
        if self._forgets == forgets_before:  # else the answer may predate the change: use it once, keep nothing
            self._owners.put(key, caller)
        return caller
