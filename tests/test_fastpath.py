"""storage.fastpath: the write path's hot statements skip SQLAlchemy's execution machinery and run on a DBAPI
cursor. What they store and read back must be exactly what SQLAlchemy stores and reads (the same text for
times, JSON and booleans on SQLite; Python-side defaults filled), errors must be SQLAlchemy's, and a track must
really take the short path. Both databases."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from sqlalchemy import bindparam, event, exc, func, select, text

from pipeline.projects import create_project
from pipeline.track import track
from storage import fastpath
from storage.models import Contact, Event, new_id, utcnow

CONTACTS = Contact.__table__
RAW_COLUMNS = "subscribed, data, created_at, updated_at"


@pytest.fixture
async def project_id(db) -> str:
    issued = await db.write(lambda s: create_project(s, "shop", "shop@shop.example", "Shop"))
    return issued.project.id


def raw_row(session, contact_id: str) -> tuple:
    """The row as the database holds it (text on SQLite), past every SQLAlchemy type."""
    return tuple(session.connection().exec_driver_sql(
        f"SELECT {RAW_COLUMNS} FROM contacts WHERE id = '{contact_id}'").one())


async def test_a_row_inserted_by_the_fast_path_is_stored_as_sqlalchemy_stores_it(db, project_id):
    moment = datetime(2026, 12, 4, 9, 30, 0, tzinfo=utcnow().tzinfo)  # no microseconds: the format must keep them
    values = {"project_id": project_id, "subscribed": False, "data": {"name": "Zoë", "n": 1.5, "tags": ["a", None]},
              "created_at": moment, "updated_at": moment}

    def write(session):
        fast, slow = new_id(), new_id()
        fastpath.execute(session, CONTACTS.insert(), {**values, "id": fast, "email": "fast@example.org"})
        session.connection().execute(CONTACTS.insert(), {**values, "id": slow, "email": "slow@example.org"})
        return raw_row(session, fast), raw_row(session, slow)

    fast_row, slow_row = await db.write(write, light=True)
    assert fast_row == slow_row


@pytest.mark.parametrize("payloads", [
    [{"name": "Zoë", "tags": ["a", None], "n": 1.5}, ["list", {"inside": [1, 2]}], {}, []],
    [["one row", {"of": "a list"}]],
    [[], []],
], ids=["mixed", "one-list", "empty-lists"])
async def test_inserts_written_together_store_what_sqlalchemy_stores(db, project_id, payloads):
    """`insert_together` (on PostgreSQL one statement of unnested arrays) stores each row as SQLAlchemy's own
    INSERT does: JSON that is an object, a list (which an array parameter would take for a dimension of its
    own) or empty, times, booleans, and Python-side defaults of columns left out; an event may name a contact
    inserted by the same call."""
    moment = datetime(2026, 12, 4, 9, 30, 0, tzinfo=utcnow().tzinfo)
    events = Event.__table__
    event_columns = "contact_id, name, data"

    def contact_row(contact_id: str, email: str, data: object) -> dict:
        return {"id": contact_id, "project_id": project_id, "email": email, "subscribed": True, "data": data,
                "created_at": moment, "updated_at": moment}

    def event_row(event_id: str, contact_id: str, data: object, keys_reversed: bool = False) -> dict:
        row = {"id": event_id, "project_id": project_id, "contact_id": contact_id, "name": "ordered", "data": data}
        return dict(reversed(row.items())) if keys_reversed else row

    def write(session):
        fast = [(new_id(), new_id()) for _ in payloads]
        slow = [(new_id(), new_id()) for _ in payloads]
        fastpath.insert_together(session, [
            (CONTACTS.insert(), [contact_row(c, f"fast{i}@example.org", {"n": i})
                                 for i, (c, _) in enumerate(fast)]),
            (events.insert(), [event_row(e, c, data, keys_reversed=i % 2 == 1)  # the same keys in another order
                               for i, ((c, e), data) in enumerate(zip(fast, payloads, strict=True))])])
        for i, ((c, e), data) in enumerate(zip(slow, payloads, strict=True)):
            session.connection().execute(CONTACTS.insert(), contact_row(c, f"slow{i}@example.org", {"n": i}))
            session.connection().execute(events.insert(), event_row(e, c, data))

        def stored(ids):
            rows = [(c, raw_row(session, c), tuple(session.connection().exec_driver_sql(
                f"SELECT {event_columns} FROM events WHERE id = '{e}'").one())) for c, e in ids]
            return [(contact, (event[0] == c, *event[1:])) for c, contact, event in rows]

        defaults = session.connection().exec_driver_sql(
            f"SELECT count(*) FROM events WHERE id = '{fast[0][1]}' AND created_at IS NOT NULL")
        return stored(fast), stored(slow), defaults.scalar_one()

    fast_rows, slow_rows, with_created_at = await db.write(write, light=True)
    assert fast_rows == slow_rows
    assert with_created_at == 1, "created_at, left out, got its Python-side default"


async def test_columns_left_out_get_their_python_defaults(db, project_id):
    def write(session):
        fast, slow = new_id(), new_id()
        fastpath.execute_many(session, CONTACTS.insert(), [
            {"id": fast, "project_id": project_id, "email": "fast@example.org", "subscribed": True}])
        session.connection().execute(CONTACTS.insert(), [
            {"id": slow, "project_id": project_id, "email": "slow@example.org", "subscribed": True}])
        return raw_row(session, fast), raw_row(session, slow)

    fast_row, slow_row = await db.write(write, light=True)
    assert fast_row[:2] == slow_row[:2]  # subscribed, and data's default: an empty object
    assert all(fast_row[2:]) and type(fast_row[2]) is type(slow_row[2])
    assert len(str(fast_row[2])) == len(str(slow_row[2]))  # the same time format


async def test_an_update_that_leaves_out_updated_at_sets_it_as_sqlalchemy_does(db, project_id):
    contact_id = new_id()
    old = datetime(2020, 1, 1, tzinfo=utcnow().tzinfo)
    await db.write(lambda s: s.connection().execute(CONTACTS.insert(), {
        "id": contact_id, "project_id": project_id, "email": "a@example.org", "subscribed": True, "data": {},
        "created_at": old, "updated_at": old}))
    update = CONTACTS.update().where(CONTACTS.c.id == bindparam("i"))

    changed = await db.write(lambda s: fastpath.execute(s, update, {"i": contact_id, "data": {"plan": "pro"}}),
                             light=True)
    row = await db.read(lambda s: s.execute(select(Contact).where(Contact.id == contact_id)).scalar_one())
    assert changed == 1
    assert row.data == {"plan": "pro"}
    assert row.updated_at > old and row.created_at == old


async def test_rows_read_by_the_fast_path_are_typed_as_sqlalchemy_reads_them(db, project_id):
    def write(session):
        contact_id = new_id()
        session.connection().execute(CONTACTS.insert(), {
            "id": contact_id, "project_id": project_id, "email": "a@example.org", "subscribed": True,
            "data": {"plan": "pro"}, "created_at": utcnow(), "updated_at": utcnow()})
        query = select(CONTACTS.c.subscribed, CONTACTS.c.data, CONTACTS.c.created_at).where(
            CONTACTS.c.id == bindparam("i"))
        return (fastpath.fetch(session, query, {"i": contact_id}),
                [tuple(row) for row in session.connection().execute(query, {"i": contact_id})])

    fast, slow = await db.write(write, light=True)
    assert fast == slow
    subscribed, data, created_at = fast[0]
    assert subscribed is True and data == {"plan": "pro"} and created_at.tzinfo is not None


async def test_a_broken_constraint_raises_sqlalchemys_integrity_error(db, project_id):
    row = {"project_id": project_id, "email": "twice@example.org", "subscribed": True, "data": {},
           "created_at": utcnow(), "updated_at": utcnow()}

    def write(session):
        fastpath.execute(session, CONTACTS.insert(), {**row, "id": new_id()})
        fastpath.execute(session, CONTACTS.insert(), {**row, "id": new_id()})

    with pytest.raises(exc.IntegrityError):
        await db.write(write, light=True)
    emails = await db.read(lambda s: list(s.execute(select(Contact.email)).scalars()))
    assert "twice@example.org" not in emails  # the transaction was rolled back whole


async def test_a_track_runs_its_statements_past_sqlalchemys_execution(db, project_id):
    """The point of the fast path: a track of a known contact runs none of its statements through SQLAlchemy's
    execution (which cost a third of a request's server time on SQLite), yet the engine's statement listeners
    still see each one."""
    await db.write(lambda s: track(s, project_id, "known@example.org", "signup", None, {"plan": "free"}), light=True)
    seen: list[str] = []
    executed: list[str] = []

    def listen(conn, cursor, statement, *args):
        seen.append(statement)

    def through_sqlalchemy(conn, clause, *args):
        executed.append(str(clause))

    engine = db.sync_engine or db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", listen)
    event.listen(engine, "before_execute", through_sqlalchemy)
    try:
        result = await db.write(
            lambda s: track(s, project_id, "known@example.org", "page-view", None, {"plan": "pro"}), light=True)
    finally:
        event.remove(engine, "before_cursor_execute", listen)
        event.remove(engine, "before_execute", through_sqlalchemy)
    assert [s for s in executed if "contacts" in s or "events" in s] == []
    assert any(s.startswith("SELECT") and "contacts" in s for s in seen)
    assert any(s.startswith("UPDATE contacts") for s in seen)
    assert any(s.startswith("INSERT INTO events") for s in seen)
    stored = await db.read(lambda s: s.execute(text("SELECT data FROM contacts WHERE id = :i"),
                                               {"i": result.contact_id}).scalar_one())
    assert "pro" in str(stored)


@pytest.mark.postgres_only
async def test_a_statement_cancelled_half_way_invalidates_its_connection(db):
    """A task cancelled while its statement runs (a scheduler stopped, a client gone) must not hand the pool a
    connection in an unknown state: the asyncpg adapter may have sent its BEGIN without recording it, and the
    next user would then write into a transaction nobody commits. SQLAlchemy's own execution invalidates such a
    connection; the fast path does the same. (PostgreSQL only: SQLite has no statement that sleeps.)"""
    invalidated = []

    def sleep(session):
        connection = session.connection()
        try:
            fastpath.fetch(session, select(func.pg_sleep(bindparam("seconds"))), {"seconds": 5})
        finally:
            invalidated.append(connection.invalidated)

    task = asyncio.create_task(db.read(sleep))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert invalidated == [True]
    left_open = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                     "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")
    assert await db.read(lambda s: s.execute(left_open).scalar_one()) == 0
