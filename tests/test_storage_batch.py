"""The group-commit writer on a real database file (or PostgreSQL): concurrent callers share a
commit, one caller's failure leaves the others' work committed and its own work absent, on both
the event-loop (light) and the writer-thread path."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import OperationalError

import storage.db
from pipeline.domains import UnverifiedSender, add_domain, save_check
from pipeline.projects import create_project
from pipeline.submit import Submission, submit
from storage.batch import write_at_commit
from storage.db import Database
from storage.models import Email, OutboxItem, utcnow
from tests.conftest import counted_commits

MESSAGE = b"From: shop@shop.example\r\nTo: a@example.org\r\nSubject: Hi\r\n\r\nHello\r\n"


@pytest.fixture
async def project_id(db) -> str:
    issued = await db.write(lambda s: create_project(s, "shop", "shop@shop.example", "Shop"))
    domain = await db.write(lambda s: add_domain(s, issued.project.id, "shop.example", "plunkd"))
    await db.write(lambda s: save_check(s, domain.id, {"verified": True, "method": "test"}))
    return issued.project.id


def count_rows(session, model) -> int:
    return session.execute(select(func.count()).select_from(model)).scalar_one()


async def submit_many(db, project_id: str, senders: list[str], light: bool) -> list:
    async def one(index: int, sender: str):
        submission = Submission(project_id, "smtp", sender, [f"user{index}@example.org"], raw=MESSAGE)
        return await db.write(lambda s: [q.email_id for q in submit(s, submission)], light=light)

    return await asyncio.gather(*[one(i, sender) for i, sender in enumerate(senders)], return_exceptions=True)


@pytest.mark.parametrize("light", [True, False], ids=["on-loop", "writer-thread"])
async def test_one_failure_in_a_batch_fails_alone(db, project_id, light):
    senders = ["shop@shop.example"] * 30
    senders[7] = senders[19] = "me@elsewhere.example"
    results = await submit_many(db, project_id, senders, light)

    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert failed == [7, 19]
    assert all(isinstance(results[i], UnverifiedSender) for i in failed)
    queued = [r[0] for r in results if not isinstance(r, Exception)]
    assert len(set(queued)) == 28
    stored = await db.read(lambda s: set(s.execute(select(Email.id)).scalars()))
    assert stored == set(queued)
    assert await db.read(count_rows, OutboxItem) == 28


@pytest.mark.parametrize("light", [True, False], ids=["on-loop", "writer-thread"])
async def test_a_row_that_breaks_a_constraint_at_commit_fails_only_its_caller(db, project_id, light):
    """Rows queued with write_at_commit are written just before the commit; an outbox row pointing at
    no email breaks the foreign key there, and only the caller that queued it sees the error."""
    outbox = OutboxItem.__table__.insert()

    def orphan(session) -> None:
        write_at_commit(session, outbox, {"id": "orphan", "email_id": "no-such-email", "due_at": utcnow(),
                                           "attempts": 0})

    good = submit_many(db, project_id, ["shop@shop.example"] * 5, light)
    bad = db.write(orphan, light=light)
    good_results, bad_result = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(bad_result, Exception)
    assert all(isinstance(r, list) for r in good_results), good_results
    assert await db.read(count_rows, OutboxItem) == 5
    assert await db.read(count_rows, Email) == 5


@pytest.mark.parametrize("light", [True, False], ids=["on-loop", "writer-thread"])
async def test_many_concurrent_callers_share_commits_and_all_land(db, project_id, light):
    """200 writes at once cost a handful of commits, not 200: counted at the engine the writer commits
    through (with `max_batch=1` this counts 200)."""
    with counted_commits(db) as commits:
        results = await submit_many(db, project_id, ["shop@shop.example"] * 200, light)
    assert all(isinstance(r, list) for r in results)
    assert 1 <= len(commits) <= 20, f"{len(commits)} commits for 200 concurrent writes"
    assert await db.read(count_rows, Email) == 200
    assert await db.read(count_rows, OutboxItem) == 200


async def test_writes_that_come_while_a_batch_runs_its_statements_share_the_next_batch(db, project_id):
    """While one batch runs its statements (a slow one here: a second of sleep in the database, or on SQLite's
    writer thread), the twenty writes that come one by one wait and share the next batch: two commits in all.
    PostgreSQL has a second writer; if it took each write as it came, nearly each would be a batch and a commit of
    its own (18 commits when measured)."""
    def slow(session) -> None:
        if db.is_postgres:
            session.execute(text("SELECT pg_sleep(1)"))
        else:
            session.connection()  # BEGIN IMMEDIATE: a transaction to commit
            time.sleep(1)

    async def one_after(delay: float, index: int) -> list[str]:
        await asyncio.sleep(delay)
        submission = Submission(project_id, "smtp", "shop@shop.example", [f"user{index}@example.org"], raw=MESSAGE)
        return await db.write(lambda s: [q.email_id for q in submit(s, submission)])

    with counted_commits(db) as commits:
        slow_write = asyncio.create_task(db.write(slow))
        await asyncio.sleep(0.1)
        assert not slow_write.done()
        results = await asyncio.gather(*[one_after(0.01 * i, i) for i in range(20)])
        await slow_write
    assert len(commits) == 2, f"{len(commits)} commits"
    assert len({email_id for ids in results for email_id in ids}) == 20
    assert await db.read(count_rows, Email) == 20


async def test_a_batch_writes_its_contents_emails_and_outbox_rows_in_one_statement_on_postgresql(db, project_id):
    """The rows a batch of sends queues for commit reach PostgreSQL as one statement (a round trip, not one per
    table: contents, then emails referencing them, then outbox rows referencing those), and SQLite as one
    executemany per table; either way every row lands with the values queued."""
    engine = db.sync_engine if db.sync_engine is not None else db.engine.sync_engine
    inserts: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().startswith(("INSERT", "WITH")):
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        results = await submit_many(db, project_id, ["shop@shop.example"] * 10, light=True)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert all(isinstance(r, list) for r in results), results
    written = [s for s in inserts if "INSERT INTO contents" in s or "INSERT INTO outbox" in s]
    if db.is_postgres:
        assert len(written) <= 2, written  # the ten may take two batches
        assert all("INSERT INTO contents" in s and "INSERT INTO emails" in s and "INSERT INTO outbox" in s
                   for s in written), written
    else:
        assert 2 <= len(written) <= 4, written
    emails = await db.read(lambda s: s.execute(select(Email.recipient, Email.status, Email.content_id)).all())
    assert sorted(e.recipient for e in emails) == sorted(f"user{i}@example.org" for i in range(10))
    assert {e.status for e in emails} == {"QUEUED"}
    raws = await db.read(lambda s: s.execute(text("SELECT raw FROM contents")).scalars().all())
    assert len(raws) == 10 and all(raw == MESSAGE for raw in raws)
    outbox = await db.read(lambda s: s.execute(select(OutboxItem.email_id, OutboxItem.attempts)).all())
    assert sorted(o.email_id for o in outbox) == sorted(r[0] for r in results)
    assert {o.attempts for o in outbox} == {0}


@pytest.mark.parametrize("light", [True, False])
async def test_database_errors_never_carry_the_values_written(db, light, caplog):
    """Errors from a write are logged and may reach SMTP logs; the statement's values (message bytes,
    addresses) must not be in them."""
    from sqlalchemy.exc import IntegrityError

    issued = await db.write(lambda s: create_project(s, "shop", "shop@shop.example", "Shop"))
    secret_body = b"secret-message-body-7c1f"

    def orphan_content(session):
        write_at_commit(session, Email.__table__.insert(), {
            "id": "e1", "project_id": issued.project.id, "content_id": "no-such-content",
            "recipient": "private-recipient@example.org", "sender": "shop@shop.example",
            "subject": secret_body.decode(), "source": "api", "status": "QUEUED", "created_at": utcnow()})

    with pytest.raises(IntegrityError) as raised:
        await db.write(orphan_content, light=light)
    text = str(raised.value) + caplog.text
    assert "private-recipient@example.org" not in text and secret_body.decode() not in text
    assert "INSERT INTO emails" in str(raised.value)


async def test_stopping_while_a_write_waits_for_the_writer_thread_ends_the_writer(tmp_path):
    """Shutting down while a batch waits for the SQLite writer thread (busy with other work) fails that
    write with the shutdown message and ends the writer; it once swallowed the cancellation and kept
    `stop` (and the server's shutdown) waiting forever. SQLite only: PostgreSQL has no writer thread."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'writer.sqlite3'}")
    await db.migrate()
    db.writer.start()
    assert db.writer._thread is not None
    release = threading.Event()
    db.writer._thread.submit(release.wait, 10)  # the writer thread busy elsewhere
    writing = asyncio.create_task(db.write(lambda session: None))
    await asyncio.sleep(0.1)  # its batch is submitted to the busy thread
    threading.Timer(0.3, release.set).start()
    await asyncio.wait_for(db.dispose(), 5)
    with pytest.raises(RuntimeError, match="the server is shutting down"):
        await writing


async def test_a_writer_takes_the_lock_as_soon_as_another_process_lets_it_go_and_fails_at_the_deadline(
        tmp_path, monkeypatch):
    """Another process's write transaction (here a plain sqlite3 connection) holds SQLite's write lock for 0.35 s:
    a write waiting for it commits within a few milliseconds of its release (SQLite's busy handler, sleeping up
    to 100 ms between tries, took it 78 ms late). Held past the wait's deadline, the write fails with SQLite's
    "database is locked". SQLite only."""
    path = tmp_path / "locked.sqlite3"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.migrate()
    await db.write(lambda session: session.execute(text("SELECT 1")))  # the writer's connection is open
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        released = []
        timer = threading.Timer(0.35, lambda: (other.execute("ROLLBACK"), released.append(time.monotonic())))
        timer.start()
        await db.write(lambda session: session.execute(text("CREATE TABLE written_after (id INTEGER)")))
        done = time.monotonic()
        timer.join()
        assert released and 0 <= done - released[0] < 0.04, done - released[0]

        monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_SECONDS", 0.2)
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            await db.write(lambda session: session.execute(text("SELECT 1")))
        assert 0.2 <= time.monotonic() - started < 2
        other.execute("ROLLBACK")
        await db.write(lambda session: None)
    finally:
        other.close()
        await db.dispose()


async def test_a_write_that_comes_while_a_bulk_write_waits_runs_first(tmp_path):
    """A request's write that comes while a campaign chunk (`alone`) waits for the SQLite writer runs before
    the chunk, in a transaction without it: it waits for the write in progress only. SQLite only:
    on PostgreSQL an `alone` write has a connection of its own and never waits in the batch queue."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'writer.sqlite3'}")
    await db.migrate()
    order: list[str] = []
    release = threading.Event()
    try:
        busy = asyncio.create_task(db.write(lambda session: release.wait(10)))
        await asyncio.sleep(0.1)  # the writer runs `busy` on its thread
        chunk = asyncio.create_task(db.write(lambda session: order.append("chunk"), alone=True))
        await asyncio.sleep(0.05)
        request = asyncio.create_task(db.write(lambda session: order.append("request"), light=True))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(asyncio.gather(busy, chunk, request), 10)
    finally:
        release.set()
        await db.dispose()
    assert order == ["request", "chunk"]


async def test_a_bulk_write_is_not_held_back_by_a_steady_stream_of_writes(tmp_path):
    """While requests keep coming (each batch's request queues the next one, so one always waits when the
    writer picks its next batch), a waiting bulk write still runs once `BULK_PATIENCE` batches passed it."""
    from storage.batch import BULK_PATIENCE

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'writer.sqlite3'}")
    await db.migrate()
    batches: list[str] = []
    stream: list[asyncio.Task] = []
    release = threading.Event()

    def first_request(session) -> None:
        release.wait(10)
        batches.append("request")

    def next_request(session) -> None:
        batches.append("request")
        if len(stream) < BULK_PATIENCE * 3:
            stream.append(asyncio.ensure_future(db.write(next_request, light=True)))

    try:
        busy = asyncio.create_task(db.write(first_request))
        await asyncio.sleep(0.1)
        chunk = asyncio.create_task(db.write(lambda session: batches.append("chunk"), alone=True))
        stream.append(asyncio.ensure_future(db.write(next_request, light=True)))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(asyncio.gather(busy, chunk), 10)
        while not all(task.done() for task in stream):
            await asyncio.wait_for(asyncio.gather(*stream), 10)
    finally:
        release.set()
        await db.dispose()
    assert len(batches) == BULK_PATIENCE * 3 + 2
    assert batches.index("chunk") == BULK_PATIENCE + 1, batches


async def test_accepting_writes_leave_checkpoints_of_the_first_32_mb_to_others(tmp_path):
    """The accepting writer's commits do not copy the WAL into the database file every 4 MB (SQLite's
    default), which held each fortieth 100 KB message's reply for the copy and its sync: after 6 MB of
    commits the database file is as small as before and the WAL holds them. SQLite only (a WAL file)."""
    from sqlalchemy import text

    path = tmp_path / "writer.sqlite3"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.migrate()
    try:
        await db.write(lambda s: s.execute(text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB)")))
        before = path.stat().st_size
        for _ in range(60):
            await db.write(lambda s: s.execute(text("INSERT INTO blobs (body) VALUES (randomblob(100000))")))
        assert path.stat().st_size - before < 1_000_000
        assert path.with_name(path.name + "-wal").stat().st_size > 6_000_000
    finally:
        await db.dispose()
