"""Baseline of bench.track and bench.send (and, through bench.bare_sns_server, bench.feedback): a bare aiohttp
handler that parses the JSON body and inserts one row, in a transaction of its own committed before it answers.

SQLite: the standard library's sqlite3, one connection used by one writer thread, with the pragmas storage/db.py
gives plunkd's writer: WAL and synchronous=FULL (an fsync per commit, the durability plunkd answers with), or
with `--synchronous NORMAL` no fsync at commit (the benchmarks' second figure). PostgreSQL: asyncpg, one INSERT
per request (autocommit) on a pool as large as plunkd's.

    python -m bench.bare_insert_server <SQLite file | postgresql URL> <port> [--synchronous FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import asyncpg
from aiohttp import web

Insert = Callable[..., Awaitable[None]]
"""`await insert(*values)`: one row, its values in the table's column order, committed."""
Handler = Callable[[web.Request], Awaitable[web.Response]]

POSTGRES_POOL = 20
"""plunkd's pool on PostgreSQL: pool_size 10 plus max_overflow 10 (storage/db.py)."""


def server_args(parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The baseline servers' options; a caller's parser may add its own first."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("database", help="an SQLite file (made here) or a postgresql URL")
    parser.add_argument("port", type=int)
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL", help="SQLite only")
    return parser.parse_args()


def sqlite_writer(path: str, synchronous: str) -> sqlite3.Connection:
    """A connection with storage/db.py's pragmas, in autocommit mode: each INSERT is its own transaction."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("auto_vacuum=INCREMENTAL", "journal_mode=WAL", f"synchronous={synchronous}", "foreign_keys=ON",
                   "busy_timeout=30000"):
        conn.execute(f"PRAGMA {pragma}")
    return conn


def serve(args: argparse.Namespace, path: str, table: str, columns: dict[str, str],
          handler_for: Callable[[Insert], Handler]) -> None:
    """Serve `POST path` with `handler_for(insert)`, where `insert` writes one row of `table`, made at start with
    `columns` (name → SQL type, the first the primary key). Also the frame of bench/bare_sns_server.py."""
    names = ", ".join(columns)
    create = (f"CREATE TABLE {table} ({', '.join(f'{name} {kind}' for name, kind in columns.items())}, "
              f"PRIMARY KEY ({next(iter(columns))}))")
    app = web.Application()

    if args.database.startswith("postgresql"):
        pool: asyncpg.Pool | None = None
        statement = f"INSERT INTO {table} ({names}) VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})"

        async def insert(*values: object) -> None:
            assert pool is not None
            await pool.execute(statement, *values)

        async def postgres(_app: web.Application) -> AsyncIterator[None]:
            nonlocal pool
            pool = await asyncpg.create_pool(args.database.replace("+asyncpg", ""), min_size=POSTGRES_POOL,
                                             max_size=POSTGRES_POOL)
            await pool.execute(create)
            yield
            await pool.close()

        app.cleanup_ctx.append(postgres)
    else:
        conn = sqlite_writer(args.database, args.synchronous)
        conn.execute(create)
        writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        statement = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"

        async def insert(*values: object) -> None:
            await asyncio.get_running_loop().run_in_executor(writer, conn.execute, statement, values)

    app.router.add_post(path, handler_for(insert))
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: None, access_log=None)


def inserting(insert: Insert) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        await insert(str(uuid.uuid4()), json.dumps(body))
        return web.json_response({"success": True})

    return handle


if __name__ == "__main__":
    serve(server_args(), "/insert", "bare_rows", {"id": "VARCHAR(36)", "body": "TEXT"}, inserting)
