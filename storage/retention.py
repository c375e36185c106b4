"""Retention queries: drop the MIME bytes of settled emails, delete old email rows, give SQLite's freed
pages back to the file system. `maintenance.pruner` calls these in small batches.

Ages are read from the ids. They are UUIDv7 (`storage.models.new_id`), so every row created before a
moment has an id below `id_bound(moment)`: "older than" is a range on the primary key, with no extra
index. An email is settled (SENT, FAILED, SUPPRESSED) when it has no outbox row; nothing here touches an
email that still has one (queued, or being delivered), nor its content.

Dropping a content's bytes sets `raw` to b"" instead of deleting the row: `emails.content_id` is NOT NULL
with a foreign key, so deleting would need a schema change, and what stays (an id, a project id, a time)
is tens of bytes. The content row itself goes with the last email row that points to it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import ColumnElement, Connection, Engine, delete, func, select, update
from sqlalchemy.orm import Session

from core.randomness import uuid_text
from storage.models import Content, Email, OutboxItem

_CONTENT = Content.__table__
_EMAIL = Email.__table__
_OUTBOX = OutboxItem.__table__
AUTO_VACUUM_INCREMENTAL = 2
"""`PRAGMA auto_vacuum`: 0 none (a freed page is reused but the file never shrinks), 1 full, 2 incremental."""


def id_bound(moment: datetime) -> str:
    """The smallest id `new_id` can give at `moment` (UUIDv7: time, then counter, then randomness):
    the id of every row created before `moment` sorts below it."""
    millis = int(moment.timestamp() * 1000)
    return uuid_text((millis << 80) | (0x7 << 76) | (0b10 << 62))


def _content_queued(content_id: ColumnElement[str]) -> ColumnElement[bool]:
    """True while an email using this content still has an outbox row."""
    return (select(_OUTBOX.c.id).join(_EMAIL, _EMAIL.c.id == _OUTBOX.c.email_id)
            .where(_EMAIL.c.content_id == content_id).exists())


def _email_queued(email_id: ColumnElement[str]) -> ColumnElement[bool]:
    return select(_OUTBOX.c.id).where(_OUTBOX.c.email_id == email_id).exists()


class ContentState(NamedTuple):
    id: str
    size: int
    queued: bool


def scan_contents(session: Session, after: str, before: str, limit: int) -> list[ContentState]:
    """Up to `limit` contents with `after` < id < `before`, in id order: the size of each (read from the
    row header; the bytes themselves are not loaded) and whether an email using it is still queued."""
    stmt = (select(_CONTENT.c.id, func.length(_CONTENT.c.raw), _content_queued(_CONTENT.c.id))
            .where(_CONTENT.c.id > after, _CONTENT.c.id < before).order_by(_CONTENT.c.id).limit(limit))
    return [ContentState(*row) for row in session.connection().execute(stmt)]


def empty_contents(session: Session, content_ids: list[str]) -> int:
    """Replace the bytes of these contents with b"", checking again that no email using one is queued."""
    conn = session.connection()
    settled = (_CONTENT.c.id.in_(content_ids), func.length(_CONTENT.c.raw) > 0, ~_content_queued(_CONTENT.c.id))
    if conn.dialect.name == "sqlite":
        return _rewrite_emptied(conn, settled)
    return conn.execute(update(_CONTENT).where(*settled).values(raw=b"")).rowcount


def _rewrite_emptied(conn: Connection, settled: tuple[ColumnElement[bool], ...]) -> int:
    """SQLite: an UPDATE would leave each emptied row where it was. A leaf page holds one or two rows of
    big messages (SQLite keeps the first 0.5-4 KB of a big value on the leaf) and is rebalanced on DELETE,
    not on UPDATE, so about 2 KB per message would stay behind. Deleting the rows and inserting them again,
    empty and under the same ids, packs tens per page at the end of the table. Emails point to these rows
    meanwhile, so foreign key checks are deferred around the two statements; switching them back on
    forgets what was deferred, hence the count check (an exception rolls everything back)."""
    rows = conn.execute(select(_CONTENT.c.id, _CONTENT.c.project_id, _CONTENT.c.created_at).where(*settled)).all()
    if not rows:
        return 0
    conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
    try:
        deleted = conn.execute(delete(_CONTENT).where(_CONTENT.c.id.in_([row.id for row in rows]))).rowcount
        if deleted != len(rows):
            raise RuntimeError(f"emptying contents: deleted {deleted} rows for {len(rows)}")
        conn.execute(_CONTENT.insert(), [{"id": row.id, "project_id": row.project_id, "raw": b"",
                                          "created_at": row.created_at} for row in rows])
    finally:
        conn.exec_driver_sql("PRAGMA defer_foreign_keys = OFF")
    return deleted


class DeletedEmails(NamedTuple):
    found: int
    """Settled emails the batch picked; fewer than its limit means none is left below the bound."""
    emails: int
    contents: int


def delete_settled_emails(session: Session, before: str, limit: int) -> DeletedEmails:
    """Delete up to `limit` settled emails with id < `before` (oldest first), then those of their contents
    no email points to any more. Their events stay: `events.email_id` is a plain column, not a key."""
    conn = session.connection()
    picked = conn.execute(select(_EMAIL.c.id, _EMAIL.c.content_id)
                          .where(_EMAIL.c.id < before, ~_email_queued(_EMAIL.c.id))
                          .order_by(_EMAIL.c.id).limit(limit)).all()
    if not picked:
        return DeletedEmails(0, 0, 0)
    emails = conn.execute(delete(_EMAIL).where(_EMAIL.c.id.in_([row.id for row in picked]),
                                              ~_email_queued(_EMAIL.c.id))).rowcount
    still_used = select(_EMAIL.c.id).where(_EMAIL.c.content_id == _CONTENT.c.id).exists()
    contents = conn.execute(delete(_CONTENT).where(_CONTENT.c.id.in_(sorted({row.content_id for row in picked})),
                                                  ~still_used)).rowcount
    return DeletedEmails(len(picked), emails, contents)


def auto_vacuum_mode(session: Session) -> int:
    """SQLite's auto_vacuum setting (see AUTO_VACUUM_INCREMENTAL)."""
    return session.connection().exec_driver_sql("PRAGMA auto_vacuum").scalar_one()


def free_pages(session: Session) -> int:
    """SQLite: pages freed by deletes and not yet given back to the file system."""
    return session.connection().exec_driver_sql("PRAGMA freelist_count").scalar_one()


def release_free_pages(session: Session, pages: int) -> int:
    """SQLite with incremental auto-vacuum: move up to `pages` free pages to the end of the file and cut
    them off (the file itself shrinks at the next checkpoint). Python's sqlite3 runs this pragma, whose
    progress rows have no columns, for one step only, so each statement asks for exactly one page."""
    conn = session.connection()
    count = min(pages, conn.exec_driver_sql("PRAGMA freelist_count").scalar_one())
    for _ in range(count):
        conn.exec_driver_sql("PRAGMA incremental_vacuum(1)")
    return count


def checkpoint(session: Session) -> None:
    """SQLite: copy the WAL into the database file, which also truncates the file after a vacuum.
    PASSIVE waits for nobody; it must run outside a write transaction (use a read session)."""
    session.connection().exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def sqlite_file_bytes(engine: Engine) -> int:
    """The size on disk of an SQLite database: its file and its WAL."""
    path = Path(engine.url.database or "")
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


def vacuum_to_incremental(engine: Engine) -> int:
    """Rewrite an SQLite database with incremental auto-vacuum (an existing file cannot switch without
    this). A full VACUUM holds the write lock throughout and needs free disk as large as the database,
    so it is run by hand (`plunkd vacuum`), never at start-up. Returns the auto_vacuum mode after."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"PRAGMA auto_vacuum = {AUTO_VACUUM_INCREMENTAL}")
        cursor.execute("VACUUM")
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        mode = cursor.execute("PRAGMA auto_vacuum").fetchone()[0]
        cursor.close()
        return mode
    finally:
        raw.close()
