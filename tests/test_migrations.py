"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL:
a model change without its migration (or the reverse) fails here, not on a user's upgrade."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import String, text

from storage.db import Database, _upgrade_to_head, head_revision
from storage.models import Base


async def test_migrated_schema_matches_the_models(empty_database_url):
    db = Database(empty_database_url, 2)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync_conn: compare_metadata(MigrationContext.configure(sync_conn), Base.metadata))
    finally:
        await db.dispose()
    assert differences == []


async def test_migration_0003_keeps_queued_mail(empty_database_url):
    """Upgrading a database with mail in its outbox keeps every row, due as before, at priority 0."""
    db = Database(empty_database_url, 2)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync_conn: _upgrade_to_head(sync_conn, "0002"))
            await conn.execute(text("INSERT INTO projects VALUES ('p', 'n', 'a', 'b', 'c', 'd', 'e@x.y', '', "
                                    "CURRENT_TIMESTAMP)"))
            await conn.execute(text("INSERT INTO contents (id, project_id, raw, created_at) "
                                    "VALUES ('c', 'p', :raw, CURRENT_TIMESTAMP)"), {"raw": b"Subject: x\r\n\r\nhi"})
            await conn.execute(text("INSERT INTO emails (id, project_id, content_id, recipient, sender, subject, "
                                    "source, status, created_at) VALUES ('e', 'p', 'c', 'r@x.y', 'e@x.y', 'x', "
                                    "'api', 'QUEUED', CURRENT_TIMESTAMP)"))
            await conn.execute(text("INSERT INTO outbox (id, email_id, due_at, attempts) "
                                    "VALUES ('o', 'e', CURRENT_TIMESTAMP, 0)"))
        await db.migrate()
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, priority, campaign_id FROM outbox"))).all()
            deferred = (await conn.execute(text("SELECT deferred FROM contents"))).scalar_one()
    finally:
        await db.dispose()
    assert [tuple(row) for row in rows] == [("o", 0, None)]
    assert not deferred


async def test_migrated_partial_indexes_keep_their_predicates(empty_database_url):
    """Alembic's comparison above ignores an index's WHERE: each partial index the models declare (an index of
    only the rows it can find, such as the campaign indexes, which API and SMTP mail stays out of) is partial,
    with the same predicate, in the migrated database."""
    partial = {index.name: str(index.dialect_options["sqlite"]["where"])
               for table in Base.metadata.tables.values() for index in table.indexes
               if index.dialect_options["sqlite"]["where"] is not None}
    assert {"uq_emails_campaign_contact", "ix_emails_transport_id", "ix_outbox_campaign_id",
            "ix_emails_message_id"} <= partial.keys()
    db = Database(empty_database_url, 2)
    try:
        await db.migrate()
        query = ("SELECT indexname, indexdef FROM pg_indexes" if db.is_postgres
                 else "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        async with db.engine.connect() as conn:
            made = dict((await conn.execute(text(query))).all())
    finally:
        await db.dispose()
    for name, where in partial.items():
        assert bare(where) in bare(made[name]), (name, made[name])


def bare(sql: str) -> str:
    """SQL without spaces, parentheses and PostgreSQL's text casts, lower case, `NOT LIKE` as PostgreSQL writes it
    back (`!~~`): a predicate as declared and as the database shows it come out the same."""
    sql = sql.lower()
    for written, read_back in (("::text", ""), (" ", ""), ("(", ""), (")", ""), ("notlike", "!~~")):
        sql = sql.replace(written, read_back)
    return sql


async def test_id_columns_compare_byte_by_byte(empty_database_url):
    """Alembic's comparison above ignores collations: after the migrations every column that holds an id
    (`storage.models.ID_TYPE`, and each foreign key, which takes its column's type) collates "C" on PostgreSQL,
    and no other column does; SQLite declares no collation (its BINARY, byte order, is the default)."""
    id_columns = {(table.name, column.name) for table in Base.metadata.tables.values() for column in table.columns
                  if isinstance(column.type, String) and column.type.length == 36}
    assert {("emails", "id"), ("emails", "project_id"), ("outbox", "email_id"), ("events", "email_id")} <= id_columns
    db = Database(empty_database_url, 2)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            if db.is_postgres:
                collated = set((await conn.execute(text(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND collation_name = 'C'"))).all())
            else:
                tables = (await conn.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table'"))).scalars()
                declared = [sql for sql in tables if "COLLATE" in sql.upper()]
    finally:
        await db.dispose()
    if db.is_postgres:
        assert collated == id_columns
    else:
        assert declared == []


async def test_nodes_starting_together_migrate_once(empty_database_url):
    """Every `plunkd serve` migrates as it starts, and `docker compose up` starts two nodes on one new database at
    the same moment: each upgrade must wait for the other and then find the schema at head, not run it again
    (tables made twice, or the version row moved by the other: the node exits)."""
    nodes = [Database(empty_database_url, 2) for _ in range(3)]
    try:
        await asyncio.gather(*(node.migrate() for node in nodes))
        async with nodes[0].engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    finally:
        for node in nodes:
            await node.dispose()
    assert version == [head_revision()]
