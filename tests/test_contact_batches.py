"""storage.contacts.ContactWork: a batch made only of tracks and sends reads (and on PostgreSQL locks) all its
contacts with one statement per project, and writes their updates and events with one executemany each at commit
(a statement is a round trip on PostgreSQL, and costs more than its work on SQLite). What the batch stores must be
what one track after another stores: the same contact seen twice in a batch, a work that fails and sends the
batch round again with savepoints. Both databases."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from pipeline.projects import create_project
from pipeline.track import track
from storage.batch import run_batch
from storage.contacts import ContactWork
from storage.subscriptions import contact_for_link

TRACKS = 10


@pytest.fixture
async def project_id(db) -> str:
    issued = await db.write(lambda s: create_project(s, "shop", "shop@shop.example", "Shop"))
    return issued.project.id


def tracked(project_id: str, email: str, name: str, data: dict | None = None) -> ContactWork:
    return ContactWork(lambda s: track(s, project_id, email, name, None, data), [(project_id, email)])


async def one_batch(db, works: list) -> list:
    """Run `works` as the writer runs one batch of them (in one transaction), and return their outcomes."""
    if db.is_postgres:
        async with db.session() as session:
            return await session.run_sync(run_batch, works)
    with Session(db.sync_engine, expire_on_commit=False) as session:
        return await asyncio.to_thread(run_batch, session, works)


def statement_kinds(statements: list[str]) -> Counter:
    kinds: Counter = Counter()
    for sql in statements:
        if sql.startswith("SELECT") and "FROM contacts" in sql:
            kinds["read contacts"] += 1
        elif sql.startswith("UPDATE contacts"):
            kinds["update contacts"] += 1
        elif sql.startswith("INSERT INTO events"):
            kinds["insert events"] += 1
    return kinds


async def rows(db, sql: str, **params) -> list:
    return await db.read(lambda s: [tuple(row) for row in s.execute(text(sql), params)])


def as_data(stored: Any) -> dict:
    """A contact's data as a raw SELECT returns it: JSON text on SQLite, an object on PostgreSQL."""
    return json.loads(stored) if isinstance(stored, str) else stored


async def test_a_batch_of_tracks_reads_and_writes_its_contacts_with_one_statement_each(db, project_id):
    emails = [f"user{i}@example.org" for i in range(TRACKS)]
    await one_batch(db, [tracked(project_id, email, "signup", {"n": 0}) for email in emails])
    statements: list[str] = []
    engine = db.sync_engine or db.engine.sync_engine
    listener = event.listens_for(engine, "before_cursor_execute")(lambda c, cur, sql, *a: statements.append(sql))
    try:
        outcomes = await one_batch(db, [tracked(project_id, email, "page-view", {"n": i + 1})
                                        for i, email in enumerate(emails)])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert [ok for ok, _ in outcomes] == [True] * TRACKS
    assert statement_kinds(statements) == {"read contacts": 1, "update contacts": 1, "insert events": 1}
    stored = dict(await rows(db, "SELECT email, data FROM contacts"))
    assert {email: as_data(data) for email, data in stored.items()} == \
        {email: {"n": i + 1} for i, email in enumerate(emails)}
    assert await rows(db, "SELECT count(*) FROM events WHERE name = 'page-view'") == [(TRACKS,)]


async def test_a_batch_of_tracks_to_new_addresses_writes_its_new_contacts_with_one_statement(db, project_id):
    """A new address is written with the batch's other rows at commit, not by a statement of its own: on
    PostgreSQL a statement is a round trip in the batch's turn, and a batch of sends to new addresses took one
    per address (about half the requests a second of sends to known addresses)."""
    emails = [f"new{i}@example.org" for i in range(TRACKS)]
    statements: list[str] = []
    engine = db.sync_engine or db.engine.sync_engine
    listener = event.listens_for(engine, "before_cursor_execute")(lambda c, cur, sql, *a: statements.append(sql))
    try:
        outcomes = await one_batch(db, [tracked(project_id, email, "signup", {"n": i})
                                        for i, email in enumerate(emails)])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert [ok for ok, _ in outcomes] == [True] * TRACKS
    inserts = [sql for sql in statements if "INSERT INTO contacts" in sql]
    assert len(inserts) == 1, inserts
    if db.is_postgres:
        assert "INSERT INTO events" in inserts[0], "the contacts and their events go in one statement"
    stored = await rows(db, "SELECT c.email, c.data, c.subscribed, e.name FROM contacts c "
                            "JOIN events e ON e.contact_id = c.id ORDER BY c.email")
    assert [(email, as_data(data), bool(subscribed), name) for email, data, subscribed, name in stored] == \
        sorted((email, {"n": i}, True, "signup") for i, email in enumerate(emails))
    ids = {value.contact_id for _, value in outcomes}
    assert ids == {contact_id for (contact_id,) in await rows(db, "SELECT id FROM contacts")}


@pytest.mark.postgres_only
@pytest.mark.parametrize("alone", [False, True], ids=["beside-others", "alone"])
async def test_a_new_address_another_transaction_creates_first_becomes_that_contact_in_the_batch(db, project_id,
                                                                                                 alone):
    """Between the batch's read of its contacts and its commit, another transaction (another process or node)
    commits the same new address: the batch's own insert of it fails, the batch runs again with a savepoint
    around each work, and its works use that contact; none of them fails. A work alone in its batch too: found
    with two acceptors on PostgreSQL, where a send alone in its batch answered 500."""
    async with db.engine.connect() as other:
        created_elsewhere = []

        def track_while_another_creates_the_contact(session: Session) -> Any:
            result = track(session, project_id, "race@example.org", "signup", None, {"mine": 1})
            if not created_elsewhere:
                await_only(other.execute(text(
                    "INSERT INTO contacts (id, project_id, email, subscribed, data, created_at, updated_at) "
                    "VALUES ('created-elsewhere', :p, 'race@example.org', false, '{\"theirs\": 1}', now(), now())"),
                    {"p": project_id}))
                await_only(other.commit())
                created_elsewhere.append(True)
            return result

        racing = ContactWork(track_while_another_creates_the_contact, [(project_id, "race@example.org")])
        if alone:
            outcomes = await one_batch(db, [racing])
        else:
            outcomes = await one_batch(db, [
                tracked(project_id, "calm@example.org", "signup"), racing,
                tracked(project_id, "race@example.org", "login", {"later": 2})])
    assert [ok for ok, _ in outcomes] == [True] * len(outcomes)
    of_the_address = outcomes if alone else outcomes[1:]
    assert [value.contact_id for _, value in of_the_address] == ["created-elsewhere"] * len(of_the_address)
    later = {} if alone else {"later": 2}
    contacts = await rows(db, "SELECT id, subscribed, data FROM contacts WHERE email = 'race@example.org'")
    assert [(contact_id, subscribed, as_data(data)) for contact_id, subscribed, data in contacts] == \
        [("created-elsewhere", False, {"theirs": 1, "mine": 1, **later})]
    names = [("signup",)] if alone else [("login",), ("signup",)]
    assert await rows(db, "SELECT name FROM events WHERE contact_id = 'created-elsewhere' ORDER BY name") == names
    if not alone:
        assert await rows(db, "SELECT count(*) FROM contacts WHERE email = 'calm@example.org'") == [(1,)]


@pytest.mark.postgres_only
async def test_a_batch_waits_for_the_commit_of_a_new_address_the_previous_batch_is_creating(db, project_id):
    """The writer takes its next batch's statements while the previous batch commits: a new address of both is
    inserted by the second at once (doing nothing on conflict once the first has committed), so the second batch
    takes the first's contact without failing at its own commit and running again with savepoints."""
    statements: list[str] = []
    second: list[asyncio.Task] = []

    def record(conn, cursor, sql, *args) -> None:
        statements.append(sql)

    def while_committing() -> None:
        event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        second.append(asyncio.ensure_future(one_batch(db, [tracked(project_id, "burst@example.org", "login")])))
        await_only(asyncio.sleep(0.3))  # the second batch reads its contacts and inserts, waiting for this commit

    async with db.session() as session:
        first = await session.run_sync(run_batch, [tracked(project_id, "burst@example.org", "signup")], True,
                                       while_committing)
    try:
        later = await asyncio.wait_for(second[0], 10)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    assert [ok for ok, _ in first] == [ok for ok, _ in later] == [True]
    assert first[0][1].contact_id == later[0][1].contact_id
    assert not [sql for sql in statements if sql.startswith("SAVEPOINT")], statements
    assert await rows(db, "SELECT count(*) FROM contacts") == [(1,)]
    assert await rows(db, "SELECT name FROM events ORDER BY name") == [("login",), ("signup",)]


async def test_the_same_new_contact_twice_in_one_batch_is_one_contact_with_both_changes(db, project_id):
    outcomes = await one_batch(db, [tracked(project_id, "new@example.org", "signup", {"a": 1}),
                                    tracked(project_id, "new@example.org", "login", {"b": 2, "a": None}),
                                    tracked(project_id, "other@example.org", "signup")])
    assert [ok for ok, _ in outcomes] == [True] * 3
    first, second, other = (value for _, value in outcomes)
    assert first.contact_id == second.contact_id != other.contact_id
    contacts = await rows(db, "SELECT id, data FROM contacts WHERE email = 'new@example.org'")
    assert len(contacts) == 1 and contacts[0][0] == first.contact_id
    assert as_data(contacts[0][1]) == {"b": 2}, "the second track sees the first's data, and deletes its key"
    events = await rows(db, "SELECT name FROM events WHERE contact_id = :c ORDER BY name", c=first.contact_id)
    assert events == [("login",), ("signup",)]


async def test_a_failing_work_leaves_the_others_of_its_batch_written_once(db, project_id):
    def fails(session):
        track(session, project_id, "failing@example.org", "signup", None, {"x": 1})
        raise ValueError("this work fails after its track")

    outcomes = await one_batch(db, [tracked(project_id, "kept@example.org", "signup", {"k": 1}),
                                    ContactWork(fails, [(project_id, "failing@example.org")]),
                                    tracked(project_id, "kept@example.org", "login", {"k": 2})])
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert isinstance(outcomes[1][1], ValueError)
    assert await rows(db, "SELECT email FROM contacts ORDER BY email") == [("kept@example.org",)]
    assert await rows(db, "SELECT name FROM events ORDER BY name") == [("login",), ("signup",)]
    assert [as_data(data) for (data,) in await rows(db, "SELECT data FROM contacts")] == [{"k": 2}]


@pytest.mark.postgres_only
async def test_a_row_written_for_a_contact_in_another_transaction_holds_up_neither_a_track_nor_a_link_of_it(
        db, project_id):
    """Each row that references a contact (an event, a campaign's email) makes PostgreSQL's foreign-key check lock
    the contact FOR KEY SHARE until its transaction ends: a campaign's chunk of 2,000 recipients holds those
    locks for its whole transaction. A batch of tracks and sends, and a click on the contact's unsubscribe link,
    lock the contact only against other changes of it (FOR NO KEY UPDATE, as PostgreSQL's own UPDATE of columns
    that are no key): with FOR UPDATE, a receipt to a contact in a campaign being fanned out waited for the
    chunk's commit."""
    assert [ok for ok, _ in await one_batch(db, [tracked(project_id, "reader@example.org", "signup")])] == [True]
    contact_id = await db.read(lambda s: s.execute(text("SELECT id FROM contacts WHERE email = 'reader@example.org'"))
                               .scalar_one())
    async with db.engine.connect() as other:
        await other.execute(text("INSERT INTO events (id, project_id, contact_id, name, data, created_at) "
                                 "VALUES ('held-event', :p, :c, 'held', '{}', now())"),
                            {"p": project_id, "c": contact_id})
        outcome = await asyncio.wait_for(one_batch(db, [tracked(project_id, "reader@example.org", "purchase")]), 10)
        linked = await asyncio.wait_for(db.write(lambda s: contact_for_link(s, contact_id, for_update=True)), 10)
        await other.rollback()
    assert [ok for ok, _ in outcome] == [True]
    assert linked is not None and linked.contact.email == "reader@example.org"
    names = await db.read(lambda s: sorted(s.execute(text("SELECT name FROM events")).scalars()))
    assert names == ["purchase", "signup"]
