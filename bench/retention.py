"""Database bytes per 10,000 accepted messages of ~10 KB, delivered, then pruned, against a bare table
holding only the raw messages; and how long pruning takes.

Messages (a receipt with a random attachment, base64) are accepted through `pipeline.submit` as the
SMTP relay calls it (raw MIME, one recipient each, 200 submissions per write transaction), delivered by
the real dispatcher with the file transport and no rate limit, then pruned by `maintenance.pruner.Pruner`
with its clock moved forward: first just past keep_content_days (every delivered message's bytes are
dropped), then past keep_days (email rows go too; contacts and events stay). SQLite sizes are of the
database file after a checkpoint; PostgreSQL sizes are the tables' pg_total_relation_size, also after a
plain VACUUM (what autovacuum does later).

    python -m bench.retention [--count 10000] [--size 10000] [--database-url postgresql+asyncpg://…] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import os
import random
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.common import bench_database, parse_with_quick, temp_dir
from bench.setup_sender import verify_offline
from core.config import DeliveryConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from maintenance.pruner import Pruner
from pipeline.projects import create_project
from pipeline.submit import Submission, submit
from storage import retention
from storage.db import Database
from storage.models import utcnow

SUBMISSIONS_PER_WRITE = 200
PG_TABLES_BYTES = ("SELECT sum(pg_total_relation_size(oid)) FROM pg_class "
                   "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace")
"""Every table of the schema with its indexes and TOAST (the bare table is made after the last reading)."""


def message(index: int, size: int) -> bytes:
    """A receipt with a base64 attachment of random bytes: as little compressible as real attachments
    (PostgreSQL compresses values it stores; SQLite does not)."""
    head = (f"From: Shop <shop@bench.example>\r\nTo: user{index}@example.org\r\nSubject: Receipt {index}\r\n"
            f"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode()
    body = base64.encodebytes(random.Random(index).randbytes(max(1, (size - len(head)) * 3 // 4 - 200)))
    return head + body.replace(b"\n", b"\r\n")


async def database_bytes(db: Database, vacuum: bool = False) -> int:
    if db.is_postgres:
        async with db.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            if vacuum:
                await conn.execute(text("VACUUM"))
            return int((await conn.execute(text(PG_TABLES_BYTES))).scalar_one())
    await db.read(retention.checkpoint)
    return os.path.getsize(db.engine.url.database or "")


async def bare_bytes(folder: str, db: Database, messages: list[bytes]) -> int:
    """The baseline: the same messages in a table of (integer id, bytes) and nothing else."""
    if db.is_postgres:
        async with db.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE bare_messages (id serial PRIMARY KEY, raw bytea NOT NULL)"))
            await conn.execute(text("INSERT INTO bare_messages (raw) VALUES (:raw)"), [{"raw": m} for m in messages])
        async with db.engine.connect() as conn:
            return (await conn.execute(text("SELECT pg_total_relation_size('bare_messages')"))).scalar_one()
    path = Path(folder) / "bare.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
        conn.executemany("INSERT INTO messages (raw) VALUES (?)", [(m,) for m in messages])
        conn.commit()
    return os.path.getsize(path)


def submit_each(session: Session, submissions: list[Submission]) -> None:
    for submission in submissions:
        submit(session, submission)


async def accept(db: Database, project_id: str, messages: list[bytes]) -> None:
    for start in range(0, len(messages), SUBMISSIONS_PER_WRITE):
        batch = [Submission(project_id, "smtp", "shop@bench.example", [f"user{start + i}@example.org"], raw=raw)
                 for i, raw in enumerate(messages[start:start + SUBMISSIONS_PER_WRITE])]
        await db.write(functools.partial(submit_each, submissions=batch))


async def deliver(db: Database, folder: str, count: int) -> None:
    settings = DeliveryConfig(rate_per_second=0, concurrency=8, batch_size=100)
    dispatcher = Dispatcher(db, FileTransport(Path(folder) / "outbox"), TokenBucket(0), settings)
    for _ in range(count // settings.batch_size + 50):
        handled = await dispatcher.run_once()
        await dispatcher.drain()
        if not handled:
            return
    raise RuntimeError("delivery did not finish")


async def prune(db: Database, keep_content_days: int, keep_days: int, days_later: float) -> tuple[float, str]:
    """One pruner pass as if `days_later` days had gone by; (seconds, what it removed)."""
    settings = DeliveryConfig(keep_content_days=keep_content_days, keep_days=keep_days)
    pruner = Pruner(db, settings, clock=lambda: utcnow() + timedelta(days=days_later))
    started = time.perf_counter()
    pruned = await pruner.run_once()
    elapsed = time.perf_counter() - started
    return elapsed, (f"{pruned.contents_emptied:,} contents emptied, {pruned.emails_deleted:,} emails and "
                     f"{pruned.contents_deleted:,} contents deleted, {pruned.pages_released:,} pages released")


async def run(args: argparse.Namespace, folder: str, url: str) -> None:
    messages = [message(i, args.size) for i in range(args.count)]
    raw_total = sum(len(m) for m in messages)
    per = 10_000 / args.count
    db = Database(url)
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "shop@bench.example", "Shop"))
    await verify_offline(url, "bench", "bench.example")
    started = time.perf_counter()
    await accept(db, issued.project.id, messages)
    accepted = time.perf_counter() - started
    started = time.perf_counter()
    await deliver(db, folder, args.count)
    delivered = time.perf_counter() - started
    rows = [("plunkd, delivered, before pruning", await database_bytes(db), "")]
    took, what = await prune(db, 7, 0, 7 + 1 / 24)
    rows.append(("after dropping delivered content", await database_bytes(db), f"{took:.2f} s: {what}"))
    if db.is_postgres:
        rows.append(("  ... and a plain VACUUM", await database_bytes(db, vacuum=True), ""))
    took, what = await prune(db, 7, 90, 90 + 1 / 24)
    rows.append(("after deleting email rows", await database_bytes(db), f"{took:.2f} s: {what}"))
    if db.is_postgres:
        rows.append(("  ... and a plain VACUUM", await database_bytes(db, vacuum=True), ""))
    bare = await bare_bytes(folder, db, messages)
    await db.dispose()
    kind = "PostgreSQL (tables with indexes and TOAST)" if args.database_url else "SQLite (file after checkpoint)"
    print(f"{args.count:,} messages of {args.size:,} bytes ({raw_total:,} raw bytes), {kind}: accepted in "
          f"{accepted:.1f} s, delivered in {delivered:.1f} s")
    print(f"{'':34} {'bytes per 10,000 msgs':>22} {'/ bare':>7}  pruning")
    print(f"{'bare table of the raw messages':34} {bare * per:>22,.0f} {1:>7.2f}")
    for title, size, note in rows:
        print(f"{title:34} {size * per:>22,.0f} {size / bare:>7.2f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--database-url", default="", help="postgresql+asyncpg://… (default: SQLite in a temp dir)")
    args = parse_with_quick(parser, count=300, size=2000)
    with temp_dir() as folder, bench_database(args.database_url, folder) as url:
        asyncio.run(run(args, folder, url))


if __name__ == "__main__":
    main()
