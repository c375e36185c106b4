"""The database: engines, the group-commit writer, reads, and Alembic migrations at start-up.

Reads go through the async engine (aiosqlite / asyncpg). Every write goes through `write()`, which
hands a *synchronous* function of a `Session` to the group-commit writer (`storage.batch`): on
SQLite that writer is one thread with its own pysqlite connection (SQLite has one writer anyway, and
a statement costs microseconds there instead of several thread hops through aiosqlite); on
PostgreSQL it runs the functions in a `Session` on asyncpg, awaited through SQLAlchemy's greenlet bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import ColumnElement, Engine, Table, create_engine, delete, event, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from core.config import sqlite_file
from core.json_text import json_column_text

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_SECONDS = 30
"""How long a SQLite connection waits for another's lock before its statement fails: in SQLite's busy handler,
and for a writer's write lock in `_sqlite_begin_immediate`."""
ACCEPTING_CHECKPOINT_PAGES = 8192
"""WAL pages (4 KiB) after which a commit of the accepting writer copies the WAL into the database file (and
syncs it) before its callers get their replies. SQLite's 1,000 made that every 4 MB, forty 100 KB messages;
the dispatcher's writer keeps 1,000 and so usually checkpoints first, off acceptance's path."""
BULK_CHUNK = 1000
"""Rows changed per transaction by `Database.write_in_chunks`: on SQLite's one writer, a request waits for one such
transaction at most (a campaign's emails cancelled: about 12 ms a thousand)."""
T = TypeVar("T")


class Database:
    def __init__(self, url: str, pool_size: int = 10, sync_every_commit: bool = True) -> None:
        """`sync_every_commit=False` (SQLite only) leaves WAL syncing to checkpoints: a commit then
        survives a crash of the process but not a power cut. Only for a process whose writes can be
        redone (the dispatcher's claims and outcomes: a lost claim is claimed again, a lost "sent" means
        one more send after a power cut); accepting mail always syncs before its 250 / 200."""
        from storage.batch import TransactionBatcher

        self.url = url
        self.is_postgres = url.startswith("postgresql")
        self.sync_engine: Engine | None = None
        self.sqlite_file = ""
        """The SQLite database's file ("" on PostgreSQL, and for an in-memory database)."""
        if self.is_postgres:
            self.engine: AsyncEngine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                                           hide_parameters=True, json_serializer=json_column_text)
        else:
            self.sqlite_file = sqlite_file(url)
            if self.sqlite_file:
                _private_sqlite_file(Path(self.sqlite_file))
            # Read connections (each an aiosqlite thread with its PRAGMAs): keep pool_size of them, as on
            # PostgreSQL; SQLAlchemy's default keeps 5 and opens and closes one per read beyond that.
            pool = {"pool_size": pool_size, "max_overflow": pool_size} if self.sqlite_file else {}
            self.engine = create_async_engine(url, connect_args={"timeout": BUSY_TIMEOUT_SECONDS}, hide_parameters=True,
                                              json_serializer=json_column_text, **pool)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            self.sync_engine = create_engine(url.replace("sqlite+aiosqlite", "sqlite+pysqlite"), hide_parameters=True,
                                             json_serializer=json_column_text,
                                             connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False})
            event.listen(self.sync_engine, "connect",
                         _sqlite_writer_connect if sync_every_commit else _sqlite_writer_connect_unsynced)
            event.listen(self.sync_engine, "begin", _sqlite_begin_immediate)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)
        self.writer = TransactionBatcher(self)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the synchronous query function `fn(session, *args)` on a read session."""
        async with self.session() as session:
            return await session.run_sync(fn, *args)

    async def write(self, fn: Callable[[Session], T], light: bool = False, alone: bool = False) -> T:
        """Run `fn(session)` in a group-committed transaction; return its result after the commit.
        `light`: `fn` runs a few small statements and nothing slow, so it may run on the event loop.
        `alone`: a big piece of work in a transaction of its own. On PostgreSQL several run at once on
        their own connections instead of one after another in a shared batch; SQLite has one writer, which
        runs it when no other write is waiting (`storage.batch`)."""
        if alone and self.is_postgres:
            from storage.batch import run_batch

            async with self.session() as session:
                [(ok, value)] = await session.run_sync(run_batch, [fn])
            if not ok:
                raise value
            return value
        return await self.writer.run(fn, light, bulk=alone)

    async def write_in_chunks(self, fn: Callable[..., int]) -> int:
        """Run `fn(session, limit=BULK_CHUNK)`, which changes at most that many rows and returns how many it changed
        (or, walking a range, how many it looked at: `storage.campaigns.park_queued`), each time in a transaction of
        its own (`alone`), until it returns fewer; returns the total. For a change of
        many rows that need not be made at once: in one transaction, a campaign's 100,000 emails cancelled held up
        every other write until its commit (4.6 s on PostgreSQL, 1.2 s on SQLite)."""
        chunk = BULK_CHUNK
        total = 0
        while True:
            changed = await self.write(functools.partial(fn, limit=chunk), alone=True)
            total += changed
            if changed < chunk:
                return total

    async def migrate(self) -> None:
        """Upgrade the schema to this version's. Processes that start together take turns, and the later ones
        find it at head: two nodes on one new PostgreSQL database (`docker compose up`), or `plunkd project
        create` beside a server starting on a new SQLite file, each made the tables, and all but one exited
        ("table alembic_version already exists"). On PostgreSQL the upgrade's transaction takes an advisory lock
        first (`_upgrade_to_head`); on SQLite, whose migrations run their DDL outside a transaction, the process
        holds a lock on a file beside the database (`_migration_turn`)."""
        async with _migration_turn(self.sqlite_file), self.engine.begin() as conn:
            await conn.run_sync(_upgrade_to_head)

    async def dispose(self) -> None:
        await self.writer.stop()
        await self.engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()


def delete_some(session: Session, table: Table, *where: ColumnElement[bool], limit: int) -> int:
    """A part of a deletion by `Database.write_in_chunks`: up to `limit` rows of `table` matching `where` (an
    index should serve it); returns how many went."""
    picked = select(table.c.id).where(*where).limit(limit)
    return session.connection().execute(delete(table).where(table.c.id.in_(picked))).rowcount


def commit_without_flush_wait(session: Session) -> None:
    """PostgreSQL: this transaction's commit returns before its WAL is on disk (`SET LOCAL synchronous_commit
    TO OFF`: the connection's next transactions wait again). Only for work that answers no one and is redone
    when lost, such as a campaign's fan-out chunk with its cursor: the WAL is flushed in order, so any later
    synchronous commit that read its rows (the dispatcher's claim of them) makes it durable first. On SQLite
    a no-op: there the fan-out's chunks go through the one writer, most of them in requests' transactions,
    which sync anyway."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def _private_sqlite_file(path: Path) -> None:
    """Make the database file (empty: SQLite takes it for a new database) readable by this user only, before
    SQLite makes it with its own mode; SQLite gives the WAL and shared-memory files the database's mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """auto_vacuum comes first: it takes effect only on a file with no tables yet, and before journal_mode,
    which writes the header of a new file. On an existing file made without it this is a no-op
    (`plunkd vacuum` converts one); with it, the pruner gives freed pages back (storage.retention)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
    cursor.close()


def _sqlite_writer_connect(dbapi_connection, record) -> None:
    """The writer syncs the WAL at every commit (synchronous=FULL): an accepted email survives a power
    cut, not only a crash, and group commit spreads that one fsync over the batch."""
    _sqlite_writer_connect_unsynced(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA synchronous=FULL")
    dbapi_connection.execute(f"PRAGMA wal_autocheckpoint={ACCEPTING_CHECKPOINT_PAGES}")


def _sqlite_writer_connect_unsynced(dbapi_connection, record) -> None:
    """A writer waits for the write lock in `_sqlite_begin_immediate`, not in SQLite's busy handler (in WAL mode
    the lock is all its statements wait for: every transaction takes it at BEGIN). SQLAlchemy, not pysqlite,
    emits BEGIN, so SAVEPOINTs work (SQLAlchemy's pysqlite recipe)."""
    _sqlite_pragmas(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    dbapi_connection.isolation_level = None


WRITE_LOCK_POLL_SECONDS = (0.001, 0.005)
"""Between tries for the write lock: the first, and after `WRITE_LOCK_PATIENT_SECONDS` of waiting (a long
transaction elsewhere, such as a VACUUM: the waiting thread then tries 200 times a second, not 1,000). Trying
every half millisecond instead made bench.campaign's SQLite fan-out slower (10.1 and 11.2 s against 8.3 and 8.6 s,
two runs each), with no better latency for the requests meanwhile."""
WRITE_LOCK_PATIENT_SECONDS = 0.1


def _sqlite_begin_immediate(conn) -> None:
    """Take the write lock up front (a deferred read-then-write transaction can fail on lock upgrade), waiting
    for another process's writer (the dispatcher's, the API's) by trying again every millisecond (every 5 ms once
    it has waited 0.1 s). SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20 and 25 ms between its tries: a
    request whose batch found the lock taken for a millisecond waited 8 or 18 more, and during a campaign's
    fan-out the dispatcher's claims and outcomes take it hundreds of times a second."""
    driver = conn.connection.driver_connection
    started = time.monotonic()
    while (waited := time.monotonic() - started) < BUSY_TIMEOUT_SECONDS:
        try:
            driver.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
        time.sleep(WRITE_LOCK_POLL_SECONDS[waited >= WRITE_LOCK_PATIENT_SECONDS])
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # the last try, through SQLAlchemy: its error is the one raised


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str | None:
    """The newest migration's revision (read from the migration files once per process)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


MIGRATION_LOCK = 0x706C_756E_6B64
"""The PostgreSQL advisory lock (a bigint, "plunkd" in ASCII) an upgrade holds until its transaction ends."""


@contextlib.asynccontextmanager
async def _migration_turn(sqlite_file: str) -> AsyncIterator[None]:
    """SQLite: an exclusive `flock` on `<database>.migrating` (made if missing) while the caller upgrades; another
    process upgrading the same file waits for it. Not on the database file itself: closing another descriptor of
    that file would drop SQLite's own (POSIX) locks on it. Nothing to do without a file."""
    if not sqlite_file:
        yield
        return
    descriptor = os.open(f"{sqlite_file}.migrating", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _upgrade_to_head(connection: Connection, revision: str = "head") -> None:
    """Alembic's upgrade, skipped when the database is at head already: alembic loads every migration file
    to find that out, which is most of a start-up's database time. On PostgreSQL it first waits for any other
    upgrade's transaction (`MIGRATION_LOCK`), so it reads the revision that one left."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    if revision == "head" and MigrationContext.configure(connection).get_current_revision() == head_revision():
        return
    command.upgrade(alembic_config(connection), revision)
