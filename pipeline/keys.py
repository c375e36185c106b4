"""Who a key belongs to, with a short-lived cache: every API request and every SMTP AUTH asks, and a
database read per ask costs more than the rest of a small request."""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.db import Database
from storage.projects import find_project_by_key


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
    seconds on every process that cached it; `forget()` drops the cache at once."""

    def __init__(self, db: Database, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.db = db
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    def forget(self) -> None:
        self._entries.clear()

    async def lookup(self, key: str) -> Caller | None:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self.db.read(find_project_by_key, key)
        caller = None
        if found is not None:
            project, kind = found
            caller = Caller(project.id, project.name, project.from_email, project.from_name, kind)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (now + self.ttl, caller)
        return caller
