"""Retention: the pruner drops the bytes of old settled emails, deletes old email rows, keeps queued
mail whole, works in bounded batches, and (SQLite) shrinks the file; `plunkd vacuum` converts a file
made without incremental auto-vacuum.

Rows are aged by writing them as if it were days ago: `submit` runs for real, with the id and clock
functions of `storage.emails` replaced by ones for a past moment (ids for a past time are how the pruner
reads age: they are time-ordered UUIDv7). Settling goes through the real dispatcher and file transport,
or through `storage.emails.mark_sent` where one recipient of a shared content must stay queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from core.config import ConfigError, load_config
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from maintenance.pruner import Pruner, batches_by_size
from pipeline.submit import Submission, submit
from storage import emails as email_store
from storage import events as event_store
from storage import retention
from storage.db import Database
from storage.models import Content, Email, utcnow
from storage.retention import ContentState
from tests.conftest import PG_URL
from tests.test_cli_and_config import plunkd
from tests.test_delivery import dispatch_all, settings


def id_at(moment) -> str:
    """A unique id as `new_id` would have made it at `moment`."""
    tail = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=uuid.UUID(retention.id_bound(moment)).int | tail))


@contextlib.contextmanager
def days_ago(days: float):
    """Rows written inside get ids and times of `days` ago."""
    moment = utcnow() - timedelta(days=days)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(email_store, "new_id", lambda: id_at(moment))
        patch.setattr(email_store, "utcnow", lambda: moment)
        yield


def message(body: str, size: int = 0) -> bytes:
    head = f"From: hello@example.com\r\nTo: list@example.org\r\nSubject: {body}\r\n\r\n{body}\r\n".encode()
    return head + (b"x" * 76 + b"\r\n") * (size // 78)


async def submit_raw(db: Database, project_id: str, recipients: list[str], raw: bytes, age_days: float = 0) -> dict:
    """Submit as the SMTP relay does (one content shared by every recipient); {recipient: email id}."""
    with days_ago(age_days):
        queued = await db.write(lambda s: submit(s, Submission(project_id, "smtp", "hello@example.com", recipients,
                                                               raw=raw)))
    return {q.email: q.email_id for q in queued}


def retention_settings(keep_content_days: int = 7, keep_days: int = 90):
    return settings(keep_content_days=keep_content_days, keep_days=keep_days)


async def stored_bytes(db: Database, email_id: str) -> bytes:
    stmt = select(Content.raw).join(Email, Email.content_id == Content.id).where(Email.id == email_id)
    return await db.read(lambda s: s.execute(stmt).scalar_one())


async def content_count(db: Database) -> int:
    return len(await db.read(lambda s: s.execute(select(Content.id)).all()))


async def statuses(db: Database, project_id: str) -> dict[str, str]:
    return {row.id: row.status for row in await db.read(email_store.list_emails, project_id)}


async def delivered(db: Database, project_id: str, folder: Path, email_id: str) -> bytes:
    row = next(r for r in await db.read(email_store.list_emails, project_id) if r.id == email_id)
    assert row.status == "SENT"
    return (folder / f"{row.transport_id}.eml").read_bytes()


def dispatcher(db: Database, folder: Path) -> Dispatcher:
    return Dispatcher(db, FileTransport(folder), TokenBucket(0), settings())


async def test_old_settled_content_is_emptied_and_queued_content_kept(api, sender, tmp_path):
    db, project, folder = api.db, api.project_id, tmp_path / "out"
    old_sent = await submit_raw(db, project, ["ann@example.org"], message("old sent"), age_days=10)
    await dispatch_all(dispatcher(db, folder))
    recent = await submit_raw(db, project, ["bob@example.org"], message("recent sent"))
    await dispatch_all(dispatcher(db, folder))
    shared = await submit_raw(db, project, ["cy@example.org", "dee@example.org"], message("old shared"), age_days=10)
    cy_outbox = next(o for o in await db.read(email_store.outbox_rows) if o.email_id == shared["cy@example.org"])
    await db.write(lambda s: email_store.mark_sent(s, cy_outbox.id, shared["cy@example.org"], "<cy@x>", "manual"))
    old_queued = await submit_raw(db, project, ["eve@example.org"], message("old queued"), age_days=10)

    pruned = await Pruner(db, retention_settings()).run_once()

    assert pruned.contents_emptied == 1 and pruned.emails_deleted == 0
    assert await stored_bytes(db, old_sent["ann@example.org"]) == b""
    assert await stored_bytes(db, recent["bob@example.org"]) == message("recent sent")
    assert await stored_bytes(db, shared["cy@example.org"]) == message("old shared"), "dee still needs it"
    assert await stored_bytes(db, old_queued["eve@example.org"]) == message("old queued")
    await dispatch_all(dispatcher(db, folder))
    assert (await delivered(db, project, folder, shared["dee@example.org"])).endswith(message("old shared"))
    assert (await delivered(db, project, folder, old_queued["eve@example.org"])).endswith(message("old queued"))
    assert (await Pruner(db, retention_settings()).run_once()).contents_emptied == 2, "now they are settled"


async def test_old_email_rows_are_deleted_and_their_events_stay(api, sender, tmp_path):
    db, project, folder = api.db, api.project_id, tmp_path / "out"
    old = await submit_raw(db, project, ["ann@example.org", "bob@example.org"], message("old"), age_days=100)
    await dispatch_all(dispatcher(db, folder))
    recent = await submit_raw(db, project, ["cy@example.org"], message("recent"), age_days=10)
    await dispatch_all(dispatcher(db, folder))
    old_queued = await submit_raw(db, project, ["dee@example.org"], message("old queued"), age_days=100)
    assert await content_count(db) == 3

    pruned = await Pruner(db, retention_settings()).run_once()

    assert (pruned.contents_emptied, pruned.emails_deleted, pruned.contents_deleted) == (2, 2, 1), \
        "bytes go first (the old ones too, so deleting rows frees little at once), then the rows"
    left = await statuses(db, project)
    assert left == {recent["cy@example.org"]: "SENT", old_queued["dee@example.org"]: "QUEUED"}
    assert await content_count(db) == 2
    assert await stored_bytes(db, recent["cy@example.org"]) == b"", "10 days old: past keep_content_days"
    sent_events = await db.read(event_store.list_events, project, 10, None, "email.sent")
    assert set(old.values()) <= {event.email_id for event in sent_events.items}, "events outlive their emails"
    assert [o.email_id for o in await db.read(email_store.outbox_rows)] == [old_queued["dee@example.org"]]
    await dispatch_all(dispatcher(db, folder))
    assert (await delivered(db, project, folder, old_queued["dee@example.org"])).endswith(message("old queued"))


async def test_zero_keeps_forever(api, sender, tmp_path):
    db, project = api.db, api.project_id
    ancient = await submit_raw(db, project, ["ann@example.org"], message("ancient"), age_days=400)
    month_old = await submit_raw(db, project, ["bob@example.org"], message("month old"), age_days=30)
    await dispatch_all(dispatcher(db, tmp_path / "out"))

    assert not await Pruner(db, retention_settings(keep_content_days=0, keep_days=0)).run_once()
    assert len(await statuses(db, project)) == 2
    assert await stored_bytes(db, ancient["ann@example.org"]) == message("ancient")

    pruned = await Pruner(db, retention_settings(keep_content_days=0, keep_days=90)).run_once()
    assert (pruned.emails_deleted, pruned.contents_deleted) == (1, 1)
    assert await stored_bytes(db, month_old["bob@example.org"]) == message("month old"), "bytes kept with the row"


async def test_each_batch_is_its_own_small_transaction(api, sender, tmp_path, monkeypatch):
    db, project = api.db, api.project_id
    for index in range(35):
        await submit_raw(db, project, [f"user{index}@example.org"], message(f"old {index}"), age_days=100)
    await dispatch_all(dispatcher(db, tmp_path / "out"), rounds=40)
    calls = {"write": 0, "read": 0}
    write, read = db.write, db.read

    async def counted_write(fn, light=False):
        calls["write"] += 1
        return await write(fn, light)

    async def counted_read(fn, *args):
        calls["read"] += 1
        return await read(fn, *args)

    monkeypatch.setattr(db, "write", counted_write)
    monkeypatch.setattr(db, "read", counted_read)
    pruner = Pruner(db, retention_settings(keep_days=0), batch_rows=10)
    now = utcnow()

    assert await pruner.drop_old_content(now) == 35
    assert calls == {"write": 4, "read": 4}, "pages of 10, 10, 10, 5: one update each"
    calls.update(write=0, read=0)
    assert await pruner.drop_old_content(now) == 0
    assert calls == {"write": 0, "read": 1}, "the next pass starts after what was already emptied"

    pruner.settings.keep_days = 90
    calls.update(write=0, read=0)
    assert await pruner.delete_old_emails(now) == (35, 35)
    assert calls["write"] == 4
    assert await statuses(db, project) == {}


def test_content_batches_are_bounded_by_bytes_too():
    contents = [ContentState(f"c{i}", size, False) for i, size in enumerate((300, 300, 300, 900, 100, 100))]
    assert list(batches_by_size(contents, 700)) == [["c0", "c1"], ["c2"], ["c3"], ["c4", "c5"]]


class TestOnAnSqliteFile:
    """SQLite's own file behaviour, on an SQLite file in every run (the PostgreSQL run too)."""

    @pytest.fixture
    def database_url(self, tmp_path):
        return f"sqlite+aiosqlite:///{tmp_path / 'own.sqlite3'}"

    async def test_sqlite_file_shrinks_after_pruning(self, api, sender, tmp_path):
        db, project = api.db, api.project_id
        path = Path(db.sync_engine.url.database)
        assert await db.read(retention.auto_vacuum_mode) == retention.AUTO_VACUUM_INCREMENTAL, "a new file"
        for index in range(40):
            await submit_raw(db, project, [f"user{index}@example.org"], message(f"big {index}", 100_000), age_days=10)
        await dispatch_all(dispatcher(db, tmp_path / "out"), rounds=40)
        await db.read(retention.checkpoint)
        before = os.path.getsize(path)
        assert before > 4_000_000

        pruned = await Pruner(db, retention_settings()).run_once()

        assert pruned.contents_emptied == 40 and pruned.pages_released > 900
        assert os.path.getsize(path) < before - 3_500_000
        assert await db.read(retention.free_pages) == 0
        assert await db.read(lambda s: s.connection().exec_driver_sql("PRAGMA foreign_key_check").all()) == []
        defer = await db.write(lambda s: s.connection().exec_driver_sql("PRAGMA defer_foreign_keys").scalar_one())
        assert defer == 0, "the writer checks foreign keys per statement again"


async def test_vacuum_command_converts_a_file_made_without_auto_vacuum(tmp_path, caplog):
    path = tmp_path / "data" / "old.sqlite3"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute("CREATE TABLE made_by_an_older_plunkd (x)")
        old.execute("INSERT INTO made_by_an_older_plunkd VALUES (zeroblob(2000000))")
        old.commit()
    env = {"PLUNKD_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    assert plunkd(tmp_path, "migrate", env=env).returncode == 0
    with contextlib.closing(sqlite3.connect(path)) as old:
        assert old.execute("PRAGMA auto_vacuum").fetchone() == (0,), "the pragma cannot change a file with tables"
        old.execute("DELETE FROM made_by_an_older_plunkd")
        old.commit()
    caplog.set_level(logging.INFO, logger="plunkd.maintenance")
    db = Database(env["PLUNKD_DATABASE_URL"])
    await Pruner(db, retention_settings()).hint_full_vacuum()
    await db.dispose()
    assert "plunkd vacuum" in caplog.text, "a one-time hint at start"
    size_before = os.path.getsize(path)

    result = plunkd(tmp_path, "vacuum", env=env)

    assert result.returncode == 0, result.stderr
    assert f"{size_before:,} bytes before" in result.stdout and "incremental" in result.stdout
    assert os.path.getsize(path) < size_before - 1_500_000
    with contextlib.closing(sqlite3.connect(path)) as converted:
        assert converted.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        assert converted.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    caplog.clear()
    db = Database(env["PLUNKD_DATABASE_URL"])
    await Pruner(db, retention_settings()).hint_full_vacuum()
    await db.dispose()
    assert "plunkd vacuum" not in caplog.text


async def test_vacuum_command_on_the_configured_database(tmp_path, database_url):
    """PostgreSQL is left to its autovacuum; a new SQLite file is vacuumed (it is incremental already)."""
    result = plunkd(tmp_path, "vacuum", env={"PLUNKD_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert ("autovacuum" if PG_URL else "bytes before") in result.stdout


async def test_served_app_runs_the_pruner_beside_the_dispatcher(aiohttp_client, config):
    from plunkd.app import create_app

    config.delivery.enabled = True
    await aiohttp_client(create_app(config))
    assert "pruner" in {task.get_name() for task in asyncio.all_tasks()}


def test_retention_settings_have_defaults_and_are_checked():
    defaults = load_config(env={})
    assert (defaults.delivery.keep_content_days, defaults.delivery.keep_days) == (7, 90)
    assert load_config(env={"PLUNKD_DELIVERY_KEEP_DAYS": "0"}).delivery.keep_days == 0
    with pytest.raises(ConfigError, match=r"^config key delivery.keep_content_days: expected a number of days >= 0$"):
        load_config(env={"PLUNKD_DELIVERY_KEEP_CONTENT_DAYS": "-1"})
