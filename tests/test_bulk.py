"""`storage.bulk` on the real databases (SQLite, or PostgreSQL with PLUNKD_TEST_DATABASE_URL): rows written
through one JSON parameter read back exactly as the ORM writes them, and compare with the ORM's own values
(on SQLite datetimes are text, so a wrongly formatted one would sort wrongly and a due run never be due)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from pipeline.projects import create_project
from storage import bulk
from storage.models import Contact, new_id

CONTACTS = Contact.__table__
COLUMNS = [("id", "text"), ("project_id", "text"), ("email", "text"), ("subscribed", "bool"), ("data", "json"),
           ("created_at", "time"), ("updated_at", "time")]
NOON = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


async def test_rows_written_in_bulk_read_back_as_written(db):
    project = (await db.write(lambda s: create_project(s, "bulk", "a@example.com", "A"))).project.id
    paris = timezone(timedelta(hours=1))
    rows = [[new_id(), project, "whole@example.org", True, {"n": 1, "nested": {"ok": [1, "two"]}}, NOON,
             NOON.astimezone(paris)],
            [new_id(), project, "micro@example.org", False, {}, NOON + timedelta(microseconds=7), NOON],
            [new_id(), project, "quote@example.org", True, {"text": "it's \"quoted\" \\ and ünïcode"}, NOON, NOON]]
    assert await db.write(lambda s: bulk.insert_rows(s, CONTACTS, COLUMNS, rows)) == 3
    read = await db.read(lambda s: {c.email: c for c in s.execute(select(Contact)).scalars()})
    whole, micro, quote = read["whole@example.org"], read["micro@example.org"], read["quote@example.org"]
    assert whole.subscribed is True and micro.subscribed is False
    assert whole.data == {"n": 1, "nested": {"ok": [1, "two"]}} and micro.data == {}
    assert quote.data == {"text": "it's \"quoted\" \\ and ünïcode"}
    assert whole.created_at == NOON and whole.updated_at == NOON  # the Paris time is the same instant
    assert micro.created_at == NOON + timedelta(microseconds=7)


async def test_bulk_times_compare_with_query_parameters_and_orm_rows(db):
    """A time written at a whole second (no microseconds) still sorts with the ORM's text on SQLite."""
    project = (await db.write(lambda s: create_project(s, "bulk", "a@example.com", "A"))).project.id
    orm_id = new_id()

    def orm_row(session):
        session.add(Contact(id=orm_id, project_id=project, email="orm@example.org", subscribed=True, data={},
                            created_at=NOON - timedelta(microseconds=1), updated_at=NOON))

    await db.write(orm_row)
    bulk_id = new_id()
    await db.write(lambda s: bulk.insert_rows(s, CONTACTS, COLUMNS, [[bulk_id, project, "bulk@example.org", True,
                                                                      {}, NOON, NOON]]))

    def created(session, op):
        return sorted(session.execute(select(Contact.email).where(op(Contact.created_at))).scalars())

    assert await db.read(created, lambda c: c <= NOON) == ["bulk@example.org", "orm@example.org"]
    assert await db.read(created, lambda c: c < NOON) == ["orm@example.org"]
    assert await db.read(created, lambda c: c >= NOON) == ["bulk@example.org"]
    order = await db.read(lambda s: list(s.execute(select(Contact.email).order_by(Contact.created_at)).scalars()))
    assert order == ["orm@example.org", "bulk@example.org"]


async def test_update_rows_sets_the_given_columns_of_the_keyed_rows_only(db):
    project = (await db.write(lambda s: create_project(s, "bulk", "a@example.com", "A"))).project.id
    ids = [new_id() for _ in range(3)]
    await db.write(lambda s: bulk.insert_rows(s, CONTACTS, COLUMNS, [
        [contact_id, project, f"u{i}@example.org", True, {"i": i}, NOON, NOON] for i, contact_id in enumerate(ids)]))
    later = NOON + timedelta(hours=1)
    columns = [("id", "text"), ("subscribed", "bool"), ("data", "json"), ("updated_at", "time")]
    changed = await db.write(lambda s: bulk.update_rows(s, CONTACTS, columns, [
        [ids[0], False, {"moved": True}, later], [ids[2], True, {"list": [None, 1.5]}, later],
        [new_id(), False, {}, later]]))
    assert changed == 2
    read = await db.read(lambda s: {c.id: c for c in s.execute(select(Contact)).scalars()})
    assert (read[ids[0]].subscribed, read[ids[0]].data, read[ids[0]].updated_at) == (False, {"moved": True}, later)
    assert (read[ids[1]].subscribed, read[ids[1]].data, read[ids[1]].updated_at) == (True, {"i": 1}, NOON)
    assert read[ids[2]].data == {"list": [None, 1.5]} and read[ids[2]].email == "u2@example.org"
    assert await db.write(lambda s: bulk.update_rows(s, CONTACTS, columns, [])) == 0


async def test_an_unknown_column_kind_is_refused(db):
    with pytest.raises(ValueError, match="unknown column kind 'blob'"):
        await db.write(lambda s: bulk.insert_rows(s, CONTACTS, [("id", "blob")], [[new_id()]]))
