"""`ProjectInterest`: what a project listens for on the event path (which event names start workflow runs,
which webhook endpoints want an event), cached per process so that recording an event for a project with
no listener costs a dictionary lookup.

A transaction that writes the project's listeners calls `changed()`: this process forgets the project
now and once more when the transaction ends (committed or rolled back), and that transaction reads from
the database without caching what it saw (it may yet roll back). Another process sees a change within
`ttl` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session

V = TypeVar("V")


class ProjectInterest(Generic[V]):
    def __init__(self, name: str, ttl: float = 2.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._written = f"plunkd.{name}_written"
        self._entries: dict[str, tuple[float, V]] = {}
        self._forgets = 0
        """Raised by every forget: a load that began before one may have read the older listeners, and is not
        cached (else it would stand for `ttl` after the change it missed)."""
        self._lock = threading.Lock()
        event.listen(Session, "after_commit", self._after_commit)
        event.listen(Session, "after_soft_rollback", self._after_rollback)

    def changed(self, session: Session, project_id: str) -> None:
        """Call in a transaction that writes the project's listeners."""
        self.forget(project_id)
        session.info.setdefault(self._written, set()).add(project_id)

    def forget(self, project_id: str | None = None) -> None:
        with self._lock:
            self._forgets += 1
            if project_id is None:
                self._entries.clear()
            else:
                self._entries.pop(project_id, None)

    def get(self, session: Session, project_id: str, load: Callable[[], V]) -> V:
        """The project's value from the cache when fresh, else `load()` (cached unless this transaction
        changed the project)."""
        now = time.monotonic()
        hit = self._entries.get(project_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        forgets_before = self._forgets
        found = load()
        if project_id not in session.info.get(self._written, ()):
            with self._lock:
                if self._forgets != forgets_before:
                    return found
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[project_id] = (now + self.ttl, found)
        return found

    def _after_commit(self, session: Session) -> None:
        for project_id in session.info.pop(self._written, ()):
            self.forget(project_id)

    def _after_rollback(self, session: Session, previous: Any) -> None:
        if not previous.nested:
            for project_id in session.info.pop(self._written, ()):
                self.forget(project_id)
