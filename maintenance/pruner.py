"""The pruner: keeps storage bounded (`delivery.keep_content_days`, `delivery.keep_days`). One pass, in
order of named steps, every PASS_SECONDS:

    drop_old_content → delete_old_emails → delete_old_inbound → accounts.delete_ended (dashboard)
    → release_free_pages

Every batch is its own short transaction on the shared writer (tens of milliseconds), so mail being
accepted meanwhile waits on one batch at most, never on a whole pass. It runs beside the dispatcher (one
per node); on PostgreSQL several nodes may prune at once, which is safe (each statement checks again what
it removes), and autovacuum reclaims the space. Emails still queued or being delivered are never touched
(see `storage.retention`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from core.config import DashboardConfig, DeliveryConfig
from pipeline import accounts
from storage import inbound as inbound_store
from storage import retention
from storage.db import Database
from storage.models import utcnow

log = logging.getLogger("plunkd.maintenance")
PASS_SECONDS = 600.0
FIRST_PASS_SECONDS = 30.0
"""The first pass comes shortly after start, once start-up work is done."""
BATCH_ROWS = 500
"""Rows per transaction (at 10 KB a message, about 60 ms of SQLite's writer for the content step)."""
BATCH_BYTES = 8 * 1024 * 1024
"""Message bytes dropped per transaction at most, so a batch of big messages is no longer to write."""
VACUUM_PAGES = 256
"""Free pages given back per transaction (1 MB with SQLite's 4 KB pages)."""


@dataclass
class Pruned:
    """What one pass removed."""

    contents_emptied: int = 0
    emails_deleted: int = 0
    contents_deleted: int = 0
    inbound_deleted: int = 0
    """Routed inbound messages (raw bytes and attachments) past keep_content_days."""
    sessions_deleted: int = 0
    counts_deleted: int = 0
    """Dashboard sign-in and reset-mail attempt counts past their window."""
    pages_released: int = 0

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


class Pruner:
    def __init__(self, db: Database, settings: DeliveryConfig, batch_rows: int = BATCH_ROWS,
                 clock: Callable[[], datetime] = utcnow, dashboard: DashboardConfig | None = None) -> None:
        self.db = db
        self.settings = settings
        self.dashboard = dashboard or DashboardConfig()
        self.batch_rows = batch_rows
        self.clock = clock
        self._emptied_up_to = ""
        """Every content with an id up to this one was emptied by an earlier pass (none was queued), so a
        pass scans only what came after it. Kept in memory: after a restart, one pass scans from the start."""
        self._incremental_vacuum: bool | None = None

    async def run(self) -> None:
        await self.hint_full_vacuum()
        await asyncio.sleep(FIRST_PASS_SECONDS)
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pruning failed; next try in %.0f minutes", PASS_SECONDS / 60)
            await asyncio.sleep(PASS_SECONDS)

    async def run_once(self) -> Pruned:
        now = self.clock()
        pruned = Pruned()
        pruned.contents_emptied = await self.drop_old_content(now)
        pruned.emails_deleted, pruned.contents_deleted = await self.delete_old_emails(now)
        pruned.inbound_deleted = await self.delete_old_inbound(now)
        pruned.sessions_deleted, pruned.counts_deleted = await accounts.delete_ended(self.db, self.dashboard, now)
        pruned.pages_released = await self.release_free_pages()
        if pruned:
            log.info("pruned: %d contents emptied, %d emails and %d contents deleted, %d inbound messages deleted, "
                     "%d ended dashboard sessions and %d old attempt counts deleted, %d free pages released "
                     "(keep_content_days %d, keep_days %d)", pruned.contents_emptied, pruned.emails_deleted,
                     pruned.contents_deleted, pruned.inbound_deleted, pruned.sessions_deleted, pruned.counts_deleted,
                     pruned.pages_released,
                     self.settings.keep_content_days, self.settings.keep_days)
        return pruned

    async def drop_old_content(self, now: datetime) -> int:
        """Empty the contents older than keep_content_days whose emails are all settled. Pages of ids are
        read outside the writer; the writer only empties each page's settled ones, BATCH_BYTES at most at
        a time. Bytes go at keep_days at the latest, before their rows, so deleting rows frees little."""
        days = min((d for d in (self.settings.keep_content_days, self.settings.keep_days) if d), default=0)
        if not days:
            return 0
        before = retention.id_bound(now - timedelta(days=days))
        after = self._emptied_up_to
        emptied, done_up_to, queued_seen = 0, after, False
        while True:
            page = await self.db.read(retention.scan_contents, after, before, self.batch_rows)
            for ids in batches_by_size([row for row in page if row.size and not row.queued], BATCH_BYTES):
                emptied += await self.db.write(functools.partial(retention.empty_contents, content_ids=ids))
            for row in page:
                queued_seen = queued_seen or row.queued
                if not queued_seen:
                    done_up_to = row.id
            if len(page) < self.batch_rows:
                break
            after = page[-1].id
        self._emptied_up_to = done_up_to
        return emptied

    async def delete_old_emails(self, now: datetime) -> tuple[int, int]:
        """Delete settled email rows older than keep_days, and the contents left without an email."""
        if not self.settings.keep_days:
            return 0, 0
        before = retention.id_bound(now - timedelta(days=self.settings.keep_days))
        emails = contents = 0
        while True:
            batch = await self.db.write(lambda s: retention.delete_settled_emails(s, before, self.batch_rows))
            emails += batch.emails
            contents += batch.contents
            if batch.found < self.batch_rows:
                return emails, contents

    async def delete_old_inbound(self, now: datetime) -> int:
        """Delete routed inbound messages (their raw bytes and attachments) older than keep_content_days
        (keep_days when that is shorter): they are message content, kept as long as a sent email's."""
        days = min((d for d in (self.settings.keep_content_days, self.settings.keep_days) if d), default=0)
        if not days:
            return 0
        before = retention.id_bound(now - timedelta(days=days))
        deleted = 0
        while True:
            batch = await self.db.write(lambda s: inbound_store.delete_old_messages(s, before, self.batch_rows))
            deleted += batch
            if batch < self.batch_rows:
                return deleted

    async def release_free_pages(self) -> int:
        """SQLite with incremental auto-vacuum: give the pages freed above back, VACUUM_PAGES per
        transaction, then checkpoint so the file shrinks now. PostgreSQL: autovacuum does this."""
        if not await self._has_incremental_vacuum():
            return 0
        free = await self.db.read(retention.free_pages)
        released = 0
        for _ in range(-(-free // VACUUM_PAGES)):
            step = await self.db.write(lambda s: retention.release_free_pages(s, VACUUM_PAGES))
            released += step
            if step < VACUUM_PAGES:
                break
        if released:
            await self.db.read(retention.checkpoint)
        return released

    async def hint_full_vacuum(self) -> None:
        """Say once, at start, when the SQLite file cannot shrink and how to change that."""
        if self.db.is_postgres or await self._has_incremental_vacuum():
            return
        log.info("this SQLite database was created without incremental auto-vacuum: pruned space is reused, but "
                 "the file never shrinks. To convert it once, stop plunkd and run `plunkd vacuum` (it rewrites "
                 "the whole file and needs that much free disk)")

    async def _has_incremental_vacuum(self) -> bool:
        if self._incremental_vacuum is None:
            self._incremental_vacuum = not self.db.is_postgres and (
                await self.db.read(retention.auto_vacuum_mode) == retention.AUTO_VACUUM_INCREMENTAL)
        return self._incremental_vacuum


def batches_by_size(contents: list[retention.ContentState], max_bytes: int) -> Iterator[list[str]]:
    """The ids of `contents` in runs of at most `max_bytes` (a bigger one alone)."""
    batch: list[str] = []
    size = 0
    for content in contents:
        if batch and size + content.size > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(content.id)
        size += content.size
    if batch:
        yield batch
