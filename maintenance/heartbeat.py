"""Each process's row in the node registry (`storage.system`): written at start, its `last_heartbeat`
moved every `server.heartbeat_seconds`, deleted when the process stops cleanly. Each beat also prunes the
rows of processes unseen for a day and the send rollup's minutes older than it keeps (a few rows at most:
cheap on every node)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import timedelta
from importlib import metadata

from storage import reputation as reputation_store
from storage import system as store
from storage.db import Database
from storage.models import new_id, utcnow

log = logging.getLogger("plunkd.heartbeat")
PRUNE_AFTER = timedelta(days=1)


def plunkd_version() -> str:
    try:
        return metadata.version("plunkd")[:32]
    except metadata.PackageNotFoundError:
        return "unknown"


class Heartbeat:
    def __init__(self, db: Database, roles: list[str], every_seconds: float) -> None:
        self.db = db
        self.every_seconds = every_seconds
        now = utcnow()
        self.node_id = new_id()
        self.row: dict[str, object] = {"id": self.node_id, "hostname": socket.gethostname()[:255], "pid": os.getpid(),
                    "roles": " ".join(sorted(roles))[:100], "version": plunkd_version(), "started_at": now,
                    "last_heartbeat": now}

    async def beat(self) -> None:
        now = utcnow()
        row = {**self.row, "last_heartbeat": now}

        def work(session) -> None:
            store.heartbeat(session, row)
            store.prune_nodes(session, now - PRUNE_AFTER)
            store.prune_send_minutes(session, store.minute_of(now) - store.ROLLUP_KEEP_MINUTES)
            reputation_store.prune_days(session, reputation_store.day_of(now) - reputation_store.KEEP_DAYS)

        await self.db.write(work, light=True)

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat of node %s failed: %s", self.node_id, exc)
            await asyncio.sleep(self.every_seconds)

    async def leave(self) -> None:
        """Delete this process's row (a clean stop); a crash leaves it to turn stale."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.db.write(lambda s: store.remove_node(s, self.node_id)), 5)
